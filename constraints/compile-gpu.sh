#!/usr/bin/env bash
# Resolve the GPU image's Python packages (pyproject.toml's `gpu` extra + constraints/gpu.in) for Python 3.12 on
# linux x86_64 against the base image's torch, into constraints/gpu-ngc25.09.txt. Needs PyPI; run it after
# changing any of those inputs or the image record (constraints/ngc-pytorch-25.09.toml).
#
# Two passes, because the image's torch build (2.9.0a0+...) is on no index:
# 1. resolve with torch pinned to the public release of the image's torch series (2.9.0): every package that
#    declares a torch requirement must accept it;
# 2. resolve again at exactly those versions with the packages the image provides (torch and the builds that pin
#    it) removed, so that neither they nor what only they pull in (PyPI's CUDA 12 runtime wheels) enter the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
UV="${UV:-.venv/bin/uv}"
IMAGE_RECORD=constraints/ngc-pytorch-25.09.toml
OUT=constraints/gpu-ngc25.09.txt
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

python3 - "$IMAGE_RECORD" "$tmp" <<'PY'
import sys, tomllib
from pathlib import Path
from packaging.version import Version
record = tomllib.loads(Path(sys.argv[1]).read_text())
tmp = Path(sys.argv[2])
torch = Version(record["packages"]["torch"]).base_version
(tmp / "torch.txt").write_text(f"torch=={torch}\n")
# a marker that is never true removes the package from the resolution
(tmp / "remove.txt").write_text("".join(f'{n} ; python_version < "0"\n' for n in record["never_from_pypi"]["names"]))
(tmp / "python").write_text(record["python"])
PY
py="$(cat "$tmp/python")"
common=(pyproject.toml --extra gpu constraints/gpu.in --python-version "$py" --python-platform x86_64-manylinux_2_28
        --no-header --no-annotate --quiet)
"$UV" pip compile "${common[@]}" -c "$tmp/torch.txt" -o "$tmp/with-torch.txt"
grep -v -E '^(vllm)==' "$tmp/with-torch.txt" > "$tmp/pins.txt"
"$UV" pip compile "${common[@]}" -c "$tmp/pins.txt" --override "$tmp/remove.txt" --no-emit-package vllm -o "$tmp/lock.txt"
{
  echo "# The GPU image's Python packages, pinned: containers/Dockerfile installs them with --no-deps on top of"
  echo "# $(python3 -c "import tomllib;print(tomllib.load(open('$IMAGE_RECORD','rb'))['image'])") (recorded in $IMAGE_RECORD)."
  echo "# Made by constraints/compile-gpu.sh (uv pip compile, python $py, x86_64-manylinux_2_28): do not edit by hand."
  echo "# resolved-with: $(cat "$tmp/torch.txt")"
  echo "# built-from-source: $(grep -E '^vllm==' "$tmp/with-torch.txt")"
  cat "$tmp/lock.txt"
} > "$OUT"
echo "wrote $OUT ($(grep -c '==' "$OUT") pins)"
