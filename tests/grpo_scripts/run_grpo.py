"""`python -m recipes.grpo` (as `nrr grpo` runs it) that sends itself SIGTERM right before the rollouts of step K.

    python tests/grpo_scripts/run_grpo.py --sigterm-before-step K key=value ...
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    import recipes.grpo as grpo

    assert sys.argv[1] == "--sigterm-before-step"
    signal_at = int(sys.argv[2])
    sys.argv[1:] = sys.argv[3:]
    sample_step = grpo.sample_step

    def signalled(backend, tokenizer, sampler, cfg, step):
        if step == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return sample_step(backend, tokenizer, sampler, cfg, step)

    grpo.sample_step = signalled
    return grpo._main()


if __name__ == "__main__":
    sys.exit(main())
