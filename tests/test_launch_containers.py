"""The GPU image, checked statically (no docker engine here)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "containers" / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_base_image_is_pinned_ngc_pytorch():
    froms = [rest for word, rest in instructions() if word == "FROM"]
    assert len(froms) == 1
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3", froms[0]), froms[0]


def test_no_secret_build_args_or_env():
    for word, rest in instructions():
        if word in ("ARG", "ENV"):
            assert not re.search(r"(TOKEN|KEY|SECRET|PASSWORD|PASS)\b", rest.upper()), rest


def test_installs_the_stack():
    runs = " ".join(rest for word, rest in instructions() if word == "RUN")
    assert '-e ".[gpu]"' in runs
    for package in ("megatron-core", "vllm", "nemo-curator", "git+https://github.com/NVIDIA/NeMo-Skills.git@"):
        assert package in runs, package
    # torch / Transformer Engine stay the image's own
    assert "-c /tmp/image-pins.txt" in runs and "transformer[-_]engine" in runs
    assert "import torch, transformer_engine, megatron.core, nemo_curator, nemo_run, vllm, nemo_skills" in runs


def test_build_script_and_usage_note():
    build = (ROOT / "containers" / "build.sh").read_text()
    assert "docker build -f containers/Dockerfile" in build and "enroot import" in build
    readme = (ROOT / "containers" / "README.md").read_text()
    assert "--container-env" in readme and "executor.container_image=" in readme
