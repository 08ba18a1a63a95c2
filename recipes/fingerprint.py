"""What a resumable output was computed from, stored beside it, so that a rerun under other settings does not reuse it.

    values = flatten(dataclasses.asdict(cfg), skip=("output_dir", ...))   # dotted keys -> JSON values
    guard_reuse(outputs, stamp, values, "generation.allow_config_change", allow)

Checkpoints (recipes.resume), a curation's generations and an evaluation's samples keep one. A mismatch is a
ConfigError naming each changed key (old -> new). With the override, checkpoints continue under the new config
(recipes.resume); generations and samples are set aside instead (renamed, kept) and made again: they are records,
and a corpus or a metric mixing two settings' records would be wrong without any sign of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from recipes.config import ConfigError

UNSET = "(unset)"


def flatten(obj: dict, skip=(), prefix: str = "") -> dict:
    """Nested dicts as dotted keys; `skip` lists dotted keys (and whole sections) left out."""
    out = {}
    for key, value in obj.items():
        full = f"{prefix}{key}"
        if full in skip:
            continue
        if isinstance(value, dict) and value:
            out.update(flatten(value, skip, full + "."))
        else:
            out[full] = json.loads(json.dumps(value, default=str))
    return out


def digest(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def changes(saved: dict, now: dict) -> list[str]:
    """`key: old -> new` for each key whose value differs (a key on one side only counts as (unset) on the other)."""
    return [f"{k}: {saved.get(k, UNSET)!r} -> {now.get(k, UNSET)!r}"
            for k in sorted(saved.keys() | now.keys()) if saved.get(k, UNSET) != now.get(k, UNSET)]


def file_identity(path: str | Path) -> str:
    """A file's content hash; a folder's (a model, a `datasets` folder: too large to read each run) from the
    names, sizes and modification times of its files."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return "dir:" + h.hexdigest()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def write_stamp(stamp: Path, values: dict) -> None:
    """The fingerprint beside the outputs, swapped in whole (a kill leaves the old one or the new one)."""
    tmp = stamp.with_name(stamp.name + ".tmp")
    tmp.write_text(json.dumps({"sha256": digest(values), "config": values}, indent=1), encoding="utf-8")
    os.replace(tmp, stamp)


def guard_reuse(outputs: list[Path], stamp: Path, values: dict, override_key: str, allow: bool,
                log=print, unknown: tuple = ()) -> None:
    """Before appending to `outputs`, which a rerun reuses: if `stamp` says they were made under other values, a
    ConfigError naming each changed key, unless `allow` (the config's `override_key`): then they are renamed
    `<name>.stale-<hash>` (kept) and made again. Then the stamp is (re)written for what follows. Outputs older
    than stamps (none beside them) are reused unchecked; so are the `unknown` keys, which this run cannot tell
    (they keep their saved values)."""
    existing = [p for p in outputs if p.exists() and p.stat().st_size]
    if stamp.is_file() and existing:
        saved = json.loads(stamp.read_text(encoding="utf-8"))
        values = {**values, **{k: saved["config"][k] for k in unknown if k in saved["config"]}}
        changed = changes(saved["config"], values)
        if changed and not allow:
            names = ", ".join(p.name for p in existing)
            raise ConfigError(f"{stamp}: {names} in {stamp.parent} were made under other settings: "
                              + "; ".join(changed) + f". Rerun with the earlier values to reuse them, or set "
                              f"{override_key}=true to set them aside and make them again (or use a new output_dir)")
        if changed:
            for p in existing:
                aside, n = p.with_name(f"{p.name}.stale-{saved['sha256'][:12]}"), 1
                while aside.exists():  # back and forth between settings: every set kept
                    n += 1
                    aside = p.with_name(f"{p.name}.stale-{saved['sha256'][:12]}-{n}")
                os.replace(p, aside)
                log(f"[resume] {override_key}: {p.name} was made under other settings ({'; '.join(changed)}); "
                    f"moved to {aside.name}, made again")
    elif existing:
        log(f"[resume] {stamp.name} is missing: reusing {', '.join(p.name for p in existing)} unchecked")
    stamp.parent.mkdir(parents=True, exist_ok=True)
    write_stamp(stamp, values)
