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


def run(mode: str, ckpt: Path, report: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(SCRIPT), mode, str(ckpt), str(report)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sigkill_mid_save_never_publishes_a_half_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    killed = run("kill", ckpt, tmp_path / "kill.json")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    before = json.loads((tmp_path / "kill.json").read_text())
    # the killed save left only a .tmp folder; `latest` still names the complete step
    assert (ckpt / "latest").read_text().strip() == "1"
    assert (ckpt / "iter_0000002.tmp").is_dir() and not (ckpt / "iter_0000002").exists()
    assert (ckpt / "hf_config.json").exists() and (ckpt / "tokenizer" / "tokenizer.json").exists()

    resumed = run("resume", ckpt, tmp_path / "resume.json")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
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
