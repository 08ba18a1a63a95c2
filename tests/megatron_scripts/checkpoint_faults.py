"""Worker for tests/test_megatron_checkpoint.py: kill a save half-way, then resume.

  checkpoint_faults.py kill   CKPT REPORT   train 1 step, save step 1, then save step 2 and SIGKILL itself right
                                            after the shards are written (before the step is published)
  checkpoint_faults.py resume CKPT REPORT   load the latest step, report it, then save steps 2..4 (keep_last=2)
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.megatron import checkpointing, providers, runtime  # noqa: E402
from recipes.megatron import train_step as ts  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "recipes/assets/models/tiny-llama3/config.json"
S = 16


def batch() -> list[dict]:
    tok = torch.randint(0, 262, (2, S + 1), generator=torch.Generator().manual_seed(3))
    return [{"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": torch.ones(2, S),
             "position_ids": torch.arange(S).expand(2, S)}]


def main() -> None:
    mode, ckpt, report_path = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    runtime.init_distributed(1, 1, seed=0)
    hf = providers.load_hf_config(CONFIG)
    chunks = providers.build_model(hf, 1, 1, seed=0)
    optimizer = ts.build_optimizer(chunks, lr=1e-3)
    if mode == "kill":
        ts.optimizer_step(chunks, optimizer, batch(), S)
        loss = ts.forward_backward(chunks, batch(), S, forward_only=True)["loss"]
        checkpointing.save_checkpoint(ckpt, 1, chunks, optimizer, extra={"eval_loss": loss, "consumed": 2})
        report_path.write_text(json.dumps({"eval_loss_at_1": loss}))
        ts.optimizer_step(chunks, optimizer, batch(), S)
        from megatron.core import dist_checkpointing

        real_save = dist_checkpointing.save

        def save_then_die(*args, **kwargs):
            real_save(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)  # the shards of step 2 are on disk, nothing is published

        dist_checkpointing.save = save_then_die
        checkpointing.save_checkpoint(ckpt, 2, chunks, optimizer)
        raise SystemExit("unreachable: the save should have been killed")
    # resume
    report = {"latest_before": checkpointing.latest_step(ckpt),
              "dirs_before": sorted(p.name for p in ckpt.iterdir())}
    step, extra = checkpointing.load_checkpoint(ckpt, chunks, optimizer)
    report.update(step=step, extra=extra)
    report["eval_loss_loaded"] = ts.forward_backward(chunks, batch(), S, forward_only=True)["loss"]
    for s in (2, 3, 4):
        ts.optimizer_step(chunks, optimizer, batch(), S)
        checkpointing.save_checkpoint(ckpt, s, chunks, optimizer, keep_last=2)
    report["dirs_after"] = sorted(p.name for p in ckpt.iterdir())
    report["latest_after"] = checkpointing.latest_step(ckpt)
    report_path.write_text(json.dumps(report))
    runtime.destroy_distributed()


if __name__ == "__main__":
    main()
