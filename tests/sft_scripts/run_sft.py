"""Run the SFT (or logit KD) recipe with config overrides; optionally SIGKILL or SIGTERM the run mid-way.

    python tests/sft_scripts/run_sft.py [--kd] [--kill-before-step K | --sigterm-before-step K] key=value ...

--kd runs `recipes.kd` (its default config under the overrides) instead of SFT. Right before training step K+1
runs (after the checkpoints of the earlier steps were written), rank 0 sends its process group (itself and the
helper processes it started: torchrun gives every rank a session of its own) SIGKILL, as a crash would
(--kill-before-step; torchrun then stops the other ranks and fails), or SIGTERM, as Slurm does on preemption
(--sigterm-before-step; the ranks agree to stop at the step's end). With tp*pp > 1 the script re-launches itself
under torchrun as `nrr sft` does (`recipes.trainer.launch`) and exits with its exit code (REQUEUE_EXIT_CODE after
a SIGTERM).
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    argv = sys.argv[1:]
    args = list(argv)
    kd = bool(args) and args[0] == "--kd"
    args = args[1:] if kd else args
    kill_at, sig = None, None
    if args and args[0] in ("--kill-before-step", "--sigterm-before-step"):
        sig = signal.SIGKILL if args[0] == "--kill-before-step" else signal.SIGTERM
        kill_at, args = int(args[1]), args[2:]
    from recipes import kd as kd_recipe, sft
    from recipes.config import load_config
    from recipes.megatron import runtime
    from recipes.resume import REQUEUE_EXIT_CODE, Preempted
    from recipes.trainer import SFTConfig, launch, resolve_path, train, world_size

    cls, default = (kd_recipe.KDConfig, kd_recipe.DEFAULT_CONFIG) if kd else (SFTConfig, sft.DEFAULT_CONFIG)
    cfg = load_config(cls, resolve_path(default), ["logging.progress=false", *args])
    if world_size(cfg) > 1 and "RANK" not in os.environ:
        return launch("tests.sft_scripts.run_sft", world_size(cfg), 1, None, argv, cfg.output_dir)
    calls = {"step": 0}

    def maybe_signal(batches):
        if calls["step"] == kill_at and runtime.rank() == 0:
            os.killpg(os.getpgid(0), sig)
        calls["step"] += 1
        return batches

    hooks = {}
    if kd:  # `recipes.kd.distill`'s hooks, the signal first
        teacher, loss = kd_recipe.Teacher(cfg), kd_recipe.KDLoss(cfg.kd)
        hooks = dict(loss_fn=loss, prepare_batches=teacher.attach_logits, extra_metrics=loss.step_metrics,
                     on_init=teacher.build, stage="kd")
    if kill_at is not None:
        prepare = hooks.get("prepare_batches", lambda batches: batches)
        hooks["prepare_batches"] = lambda batches: prepare(maybe_signal(batches))
    try:
        train(cfg, **hooks)
    except Preempted:
        return REQUEUE_EXIT_CODE
    finally:
        runtime.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
