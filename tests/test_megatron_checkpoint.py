"""megatron-core engine: checkpoints survive a SIGKILL mid-save, resume exactly, keep the last K steps; a damaged
latest step (checksum mismatch, truncated or missing file, no manifest) falls back to the previous one; re-saves and
HF exports replace the old folder atomically; trainer_state.pt loads with weights_only=True."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests/megatron_scripts/checkpoint_faults.py"


def run(mode: str, ckpt: Path, report: Path) -> tuple[int, str]:
    """Run the worker in its own session; afterwards kill what is left of that session: dist_checkpointing's
    results-queue Manager process outlives a SIGKILLed parent (and would hold captured pipes open)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    log = report.with_suffix(".log")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), mode, str(ckpt), str(report)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=300)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return rc, log.read_text()


@pytest.mark.slow
def test_sigkill_mid_save_never_publishes_a_half_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    rc, log = run("kill", ckpt, tmp_path / "kill.json")
    assert rc == -signal.SIGKILL, log[-4000:]
    before = json.loads((tmp_path / "kill.json").read_text())
    # the killed save left only a .tmp folder; `latest` still names the complete step
    assert (ckpt / "latest").read_text().strip() == "1"
    assert (ckpt / "iter_0000002.tmp").is_dir() and not (ckpt / "iter_0000002").exists()
    assert (ckpt / "hf_config.json").exists() and (ckpt / "tokenizer" / "tokenizer.json").exists()

    rc, log = run("resume", ckpt, tmp_path / "resume.json")
    assert rc == 0, log[-4000:]
    r = json.loads((tmp_path / "resume.json").read_text())
    assert r["latest_before"] == 1 and r["step"] == 1
    assert r["extra"]["consumed"] == 2
    assert r["eval_loss_loaded"] == pytest.approx(before["eval_loss_at_1"], abs=1e-6)
    # later saves removed the stale .tmp and kept only the newest two steps
    assert r["latest_after"] == 4
    assert [d for d in r["dirs_after"] if d.startswith("iter_")] == ["iter_0000003", "iter_0000004"]


def test_latest_step_reads_only_complete_markers(tmp_path):
    from recipes.megatron import checkpointing

    assert checkpointing.latest_step(tmp_path) is None
    (tmp_path / "iter_0000005").mkdir()
    (tmp_path / "latest").write_text("5\n")
    assert checkpointing.latest_step(tmp_path) == 5
    (tmp_path / "latest").write_text("7\n")  # its folder is gone: the newest earlier one, with a warning
    with pytest.warns(RuntimeWarning, match="iter_0000007 is missing; using step 5"):
        assert checkpointing.latest_step(tmp_path) == 5
    (tmp_path / "latest").write_text("3\n")
    with pytest.raises(FileNotFoundError, match="iter_0000003 is missing, and no earlier step"):
        checkpointing.latest_step(tmp_path)
    (tmp_path / "latest").write_text("garbage")
    with pytest.raises(ValueError, match="step number"):
        checkpointing.latest_step(tmp_path)


def test_model_only_checkpoint_refuses_an_optimizer_clearly(tmp_path):
    code = f"""
import sys
from recipes.megatron.hf_checkpoint import init_tiny_checkpoint
from recipes.megatron import checkpointing, providers, runtime, train_step
init_tiny_checkpoint("{ROOT}/recipes/assets/models/tiny-qwen2", "{tmp_path}/base", seed=1)
runtime.init_distributed(1, 1)
chunks = providers.build_model(checkpointing.read_hf_config("{tmp_path}/base"), 1, 1)
opt = train_step.build_optimizer(chunks, lr=1e-3)
try:
    checkpointing.load_checkpoint("{tmp_path}/base", chunks, opt)
except KeyError as err:
    print("ERR", err)
print("STEP", checkpointing.load_checkpoint("{tmp_path}/base", chunks)[0])
"""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "has no optimizer state" in proc.stdout and "optimizer=None" in proc.stdout
    assert "STEP 0" in proc.stdout


# ------------------------------------------------------------------------------ checksums, fall back, atomic re-save


def worker(*args: str, log: Path) -> int:
    """The fault worker in its own session (see `run`), for the modes taking other arguments."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def largest_shard(step_folder: Path) -> Path:
    return max(step_folder.glob("*.distcp"), key=lambda p: p.stat().st_size)


@pytest.mark.slow
def test_damaged_latest_step_falls_back_and_an_interrupted_resave_keeps_the_old_step(tmp_path):
    import shutil

    from recipes.megatron import checkpointing

    base = tmp_path / "base"
    assert worker("prepare", str(base), str(tmp_path / "prepare.json"), log=tmp_path / "prepare.log") == 0, \
        (tmp_path / "prepare.log").read_text()[-4000:]
    prepared = json.loads((tmp_path / "prepare.json").read_text())
    assert json.loads((base / "iter_0000002" / "manifest.json").read_text())["step"] == 2
    copies = {name: tmp_path / name for name in ("reference", "flipped", "truncated", "deleted", "unfinished",
                                                 "resaved")}
    for path in copies.values():
        shutil.copytree(base, path)

    # one byte of a shard flipped; a shard truncated; a file deleted; a step whose manifest never got written
    shard = largest_shard(copies["flipped"] / "iter_0000002")
    data = bytearray(shard.read_bytes())
    want_sha = checkpointing._digest(shard)["sha256"]
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    got_sha = checkpointing._digest(shard)["sha256"]
    truncated = largest_shard(copies["truncated"] / "iter_0000002")
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 2)
    (copies["deleted"] / "iter_0000002" / "common.pt").unlink()
    (copies["unfinished"] / "iter_0000002" / "manifest.json").unlink()

    # a re-save of step 2 killed after writing, right before publishing: the old step 2 stays
    rc = worker("resave", str(copies["resaved"]), str(tmp_path / "resave.json"), log=tmp_path / "resave.log")
    assert rc == -signal.SIGKILL, (tmp_path / "resave.log").read_text()[-4000:]
    resaved = copies["resaved"]
    assert (resaved / "iter_0000002.tmp" / "manifest.json").is_file()  # the new copy was complete, unpublished
    assert (resaved / "latest").read_text().strip() == "2"
    assert checkpointing.verify_step(resaved, 2) == []

    specs = [f"{copies['reference']}@1"] + [str(copies[n]) for n in ("flipped", "truncated", "deleted",
                                                                         "unfinished", "resaved")]
    rc = worker("continue", str(tmp_path / "continue.json"), *specs, log=tmp_path / "continue.log")
    assert rc == 0, (tmp_path / "continue.log").read_text()[-4000:]
    r = {Path(k).name: v for k, v in json.loads((tmp_path / "continue.json").read_text()).items()}

    ref = r["reference"]
    assert ref["step"] == 1 and ref["warnings"] == [] and ref["weights_loaded"] == prepared["weights_at_1"]
    assert ref["numpy_rng_is_array"] and ref["consumed"] == 2
    expected_why = {
        "flipped": [f"{shard}: sha256 {got_sha}, expected {want_sha}"],
        "truncated": [str(truncated), "bytes, expected", "truncated"],
        "deleted": [f"{copies['deleted'] / 'iter_0000002' / 'common.pt'}: missing"],
        "unfinished": [f"{copies['unfinished'] / 'iter_0000002' / 'manifest.json'}: missing"],
    }
    for name, why in expected_why.items():
        got = r[name]
        assert got["step"] == 1, (name, got)
        assert len(got["warnings"]) == 1 and "falling back to step 1" in got["warnings"][0], (name, got)
        assert "step 2 is corrupt" in got["warnings"][0]
        for part in why:
            assert part in got["warnings"][0], (name, part, got["warnings"])
        # training goes on from step 1 to the same weights as a run resumed from step 1 on purpose
        assert got["weights_loaded"] == prepared["weights_at_1"]
        assert got["weights_final"] == ref["weights_final"], name
        # the damaged step 2 was re-saved (atomically swapped) on the way: every step checks out again
        assert got["latest_after"] == 3 and all(p == [] for p in got["problems_after"].values()), got
    assert ref["weights_final"] != prepared["weights_at_2"]

    rs = r["resaved"]
    assert rs["step"] == 2 and rs["warnings"] == [] and rs["weights_loaded"] == prepared["weights_at_2"]
    assert "iter_0000002.tmp" not in rs["dirs_after"]  # the next save removed the unpublished copy


def test_explicit_corrupt_step_and_no_usable_step_are_clear_errors(tmp_path):
    from recipes.megatron import checkpointing

    for step in (1, 2):
        d = checkpointing.step_dir(tmp_path, step)
        d.mkdir()
        (d / "shard.distcp").write_bytes(bytes(range(256)) * step)
        checkpointing._write_manifest(d, step)
    (tmp_path / "latest").write_text("2\n")
    assert checkpointing.verify_step(tmp_path, 1) == [] and checkpointing.verify_step(tmp_path, 2) == []
    (tmp_path / "iter_0000001" / "shard.distcp").write_bytes(b"x" * 256)  # same size, other bytes
    (tmp_path / "iter_0000002" / "shard.distcp").unlink()
    with pytest.raises(checkpointing.CorruptCheckpointError, match="iter_0000001/shard.distcp: sha256 [0-9a-f]{64}, "
                                                                   "expected [0-9a-f]{64}"):
        checkpointing.load_checkpoint(tmp_path, [], step=1)
    with pytest.raises(checkpointing.CorruptCheckpointError, match="no usable checkpoint step") as err:
        checkpointing.load_checkpoint(tmp_path, [])
    assert "step 2 is corrupt" in str(err.value) and "iter_0000002/shard.distcp: missing" in str(err.value)
    assert "step 1 is corrupt" in str(err.value)


def test_resave_interrupted_between_the_two_renames_is_recovered(tmp_path, monkeypatch):
    """Where the filesystem cannot swap two folders, replace_dir renames the old step aside first; a crash before
    the second rename must still leave step 3 loadable (as `.old`), and the next save puts it back."""
    from recipes.megatron import checkpointing

    final = checkpointing.step_dir(tmp_path, 3)
    final.mkdir()
    (final / "shard.distcp").write_bytes(b"old")
    checkpointing._write_manifest(final, 3)
    tmp = final.with_name(final.name + ".tmp")
    tmp.mkdir()
    (tmp / "shard.distcp").write_bytes(b"new!")
    checkpointing._write_manifest(tmp, 3)
    (tmp_path / "latest").write_text("3\n")

    real_replace = os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("crash between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(checkpointing, "_exchange", lambda a, b: False)
    monkeypatch.setattr(checkpointing.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.replace_dir(tmp, final)
    monkeypatch.setattr(checkpointing.os, "replace", real_replace)
    assert not final.exists() and final.with_name("iter_0000003.old").is_dir()
    assert checkpointing.latest_step(tmp_path) == 3 and checkpointing.saved_steps(tmp_path) == [3]
    assert checkpointing.verify_step(tmp_path, 3) == []  # the old step, complete
    checkpointing.recover_dir(final)  # what the next save does first
    assert (final / "shard.distcp").read_bytes() == b"old" and not tmp.exists()
    assert not final.with_name("iter_0000003.old").exists()


def test_resave_swaps_in_one_rename_and_never_deletes_first(tmp_path, monkeypatch):
    from recipes.megatron import checkpointing

    final, tmp = tmp_path / "iter_0000001", tmp_path / "iter_0000001.tmp"
    for d, payload in ((final, b"old"), (tmp, b"new")):
        d.mkdir()
        (d / "f").write_bytes(payload)
    removed = []
    real_rmtree = checkpointing.shutil.rmtree

    def rmtree(path, *a, **k):
        removed.append((Path(path), (Path(path) / "f").read_bytes(), final.is_dir()))
        real_rmtree(path, *a, **k)

    monkeypatch.setattr(checkpointing.shutil, "rmtree", rmtree)
    checkpointing.replace_dir(tmp, final)
    assert (final / "f").read_bytes() == b"new" and not tmp.exists()
    # the only deletion is of the old copy, after the new one is in place
    assert removed == [(tmp, b"old", True)]


def test_trainer_state_loads_with_weights_only(tmp_path):
    import random

    import numpy as np
    import torch

    from recipes.megatron import checkpointing

    np.random.seed(5)
    random.seed(5)
    state = {"step": 4, "scheduler": {"max_lr": 1e-3, "lr_decay_style": "cosine"},
             "extra": {"rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                               "torch": torch.get_rng_state(), "cuda": None}, "consumed": np.int64(8)}}
    path = tmp_path / "trainer_state.pt"
    checkpointing._write_trainer_state(path, state)
    raw = torch.load(path, map_location="cpu", weights_only=True)  # the file itself: only allowed types
    assert isinstance(raw["extra"]["rng"]["numpy"][1][checkpointing._NUMPY], torch.Tensor)
    back = checkpointing._read_trainer_state(path)
    assert back["extra"]["consumed"] == 8 and back["scheduler"] == state["scheduler"]
    assert back["extra"]["rng"]["python"] == state["extra"]["rng"]["python"]
    np.random.set_state(back["extra"]["rng"]["numpy"])  # numpy accepts it back, as the same stream
    first = np.random.rand()
    np.random.seed(5)
    assert first == np.random.rand()

    from fractions import Fraction  # picklable, but not a type weights_only=True reads back

    with pytest.raises(TypeError, match="trainer_state.pt.*weights_only=True.*Fraction"):
        checkpointing._write_trainer_state(tmp_path / "trainer_state.pt", {"extra": {"x": Fraction(1, 3)}})
    assert checkpointing._read_trainer_state(path)["step"] == 4  # the refused save left the file alone


def test_interrupted_hf_export_leaves_the_previous_export_intact(tmp_path, monkeypatch):
    import torch

    from recipes.megatron import hf_checkpoint

    hf = json.loads((ROOT / "recipes/assets/models/tiny-llama3/config.json").read_text())
    out = tmp_path / "hf"
    hf_checkpoint.write_hf_folder({"w": torch.ones(3)}, hf, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "model.safetensors" in before and "tokenizer.json" in before

    def crash(src, dst):  # the weights and configs of the new export are written by now
        (dst / "tokenizer.json").write_text("{partial")
        raise KeyboardInterrupt("killed mid-export")

    monkeypatch.setattr(hf_checkpoint, "_copy_tokenizer", crash)
    with pytest.raises(KeyboardInterrupt):
        hf_checkpoint.write_hf_folder({"w": torch.zeros(3)}, hf, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing partial at the target
    assert (tmp_path / "hf.tmp" / "model.safetensors").exists()  # the crash's leftover, beside it

    monkeypatch.undo()
    hf_checkpoint.write_hf_folder({"w": torch.zeros(3)}, hf, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]
    assert (out / "tokenizer.json").read_bytes() == before["tokenizer.json"]

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an HF model folder"):
        hf_checkpoint.write_hf_folder({"w": torch.zeros(3)}, hf, other)
    assert (other / "keep.txt").read_text() == "mine"
