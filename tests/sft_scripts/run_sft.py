"""Run the SFT recipe with config overrides; optionally SIGKILL itself or SIGTERM its process group mid-run.

    python tests/sft_scripts/run_sft.py [--kill-before-step K | --sigterm-before-step K] key=value ...

--kill-before-step K sends SIGKILL to this process right before training step K runs (after the
checkpoints of the earlier steps were written), as a crash would. --sigterm-before-step K: rank 0 sends
SIGTERM to its whole process group there (the launcher, torchrun and every rank), as Slurm does on preemption.
With parallel.tp > 1 the script re-launches itself under torchrun as `nrr sft` does (`recipes.trainer.launch`)
and exits with its exit code (REQUEUE_EXIT_CODE after a SIGTERM).
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    argv = sys.argv[1:]
    args = list(argv)
    kill_at, sig = None, None
    if args and args[0] in ("--kill-before-step", "--sigterm-before-step"):
        sig = signal.SIGKILL if args[0] == "--kill-before-step" else signal.SIGTERM
        kill_at, args = int(args[1]), args[2:]
    from recipes.config import load_config
    from recipes.megatron import runtime
    from recipes.sft import DEFAULT_CONFIG
    from recipes.resume import REQUEUE_EXIT_CODE, Preempted
    from recipes.trainer import SFTConfig, launch, resolve_path, train, world_size

    cfg = load_config(SFTConfig, resolve_path(DEFAULT_CONFIG), ["logging.progress=false", *args])
    if world_size(cfg) > 1 and "RANK" not in os.environ:
        return launch("tests.sft_scripts.run_sft", world_size(cfg), 1, None, argv, cfg.output_dir)
    calls = {"step": 0}

    def maybe_signal(batches):
        if calls["step"] == kill_at:
            if sig == signal.SIGKILL:
                os.kill(os.getpid(), sig)
            elif runtime.rank() == 0:
                os.killpg(os.getpgid(0), sig)
        calls["step"] += 1
        return batches

    try:
        train(cfg, prepare_batches=maybe_signal if kill_at is not None else None)
    except Preempted:
        return REQUEUE_EXIT_CODE
    finally:
        runtime.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
