"""megatron-core engine: checkpoints survive a SIGKILL mid-save, resume exactly, keep the last K steps."""

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
    (tmp_path / "latest").write_text("7\n")
    with pytest.raises(FileNotFoundError, match="iter_0000007"):
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
