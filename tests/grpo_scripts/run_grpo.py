"""`python -m recipes.grpo` (as `nrr grpo` runs it) that signals itself right before the rollouts of step K:
SIGTERM, as Slurm does on preemption (the ranks agree to stop at the step's end), or SIGKILL of rank 0's process
group, as a crash would (torchrun then stops the other ranks and fails).

    python tests/grpo_scripts/run_grpo.py --sigterm-before-step K key=value ...
    python tests/grpo_scripts/run_grpo.py --kill-before-step K parallel.tp=2 key=value ...

With tp*pp > 1 the script re-launches itself under torchrun as `nrr grpo` does (`recipes.trainer.launch`).
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    import recipes.grpo as grpo
    from recipes.config import load_config, resolve_path
    from recipes.trainer import launch, world_size

    argv = sys.argv[1:]
    assert argv[0] in ("--sigterm-before-step", "--kill-before-step"), argv[:1]
    sig = signal.SIGTERM if argv[0] == "--sigterm-before-step" else signal.SIGKILL
    signal_at, args = int(argv[1]), argv[2:]
    cfg = load_config(grpo.GRPOConfig, resolve_path(grpo.DEFAULT_CONFIG), args)
    if world_size(cfg) > 1 and "RANK" not in os.environ:
        return launch("tests.grpo_scripts.run_grpo", world_size(cfg), 1, None, argv, cfg.output_dir)
    sys.argv[1:] = args
    sample_step = grpo.sample_step

    def signalled(backend, tokenizer, sampler, cfg, step):  # runs on rank 0, which holds the rollout engine
        if step == signal_at:
            if sig == signal.SIGKILL:
                os.killpg(os.getpgid(0), sig)
            os.kill(os.getpid(), sig)
        return sample_step(backend, tokenizer, sampler, cfg, step)

    grpo.sample_step = signalled
    return grpo._main()


if __name__ == "__main__":
    sys.exit(main())
