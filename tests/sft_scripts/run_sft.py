"""Run the SFT recipe in this process with config overrides; optionally SIGKILL itself mid-run.

    python tests/sft_scripts/run_sft.py [--kill-before-step K] key=value ...

--kill-before-step K sends SIGKILL to this process right before training step K runs (after the
checkpoints of the earlier steps were written), as a crash or a preempted job would.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    args = sys.argv[1:]
    kill_at = None
    if args and args[0] == "--kill-before-step":
        kill_at, args = int(args[1]), args[2:]
    from recipes.config import load_config
    from recipes.megatron import runtime
    from recipes.sft import DEFAULT_CONFIG
    from recipes.trainer import SFTConfig, resolve_path, train

    cfg = load_config(SFTConfig, resolve_path(DEFAULT_CONFIG), ["logging.progress=false", *args])
    calls = {"step": 0}

    def maybe_kill(batches):
        if calls["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        calls["step"] += 1
        return batches

    train(cfg, prepare_batches=maybe_kill if kill_at is not None else None)
    runtime.destroy_distributed()


if __name__ == "__main__":
    main()
