"""Worker for tests/test_megatron_distopt.py: train the tiny model with or without megatron's distributed optimizer.

Run as a single process or under `python -m torch.distributed.run --nproc_per_node 2` (DP=2, or TP=2 with --tp 2).
Every step has the same global batch at any layout: 2 micro-batches of [2, 32], split over the DP ranks. The
learning rate follows megatron's warmup + cosine scheduler, so a resumed run must restore it too.

  train (unless --no-train): 5 AdamW steps from the seeded init at --tp; with --save, a checkpoint (model +
      optimizer + scheduler) after step 3.
  resume (--load DIR, after training): at --resume-tp (the same processes, megatron's groups rebuilt), for each of
      --resume-with (regular, distributed), a fresh model and optimizer of that kind load DIR and take steps 4, 5.

Rank 0 writes a JSON report to --out:
  losses, grad_norms  per step (train mode)
  ranks               per rank: dp_rank, held (train_step.held_bytes after step 1), grad_buffer_numel,
                      grad_buffer_numel_unpadded (megatron's DDP buffer, summed over buffers), dp
  resumed             {kind: {"step", "losses", "grad_norms"}} (resume mode)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.megatron import checkpointing, providers, runtime  # noqa: E402
from recipes.megatron import train_step as ts  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "recipes/assets/models/tiny-qwen2/config.json"
S, B, MICRO, STEPS, SAVE_AT = 32, 2, 2, 5, 3


def make_batch(gen: torch.Generator) -> dict:
    tok = torch.randint(0, 262, (B, S + 1), generator=gen)
    mask = torch.ones(B, S)
    mask[:, : int(torch.randint(1, 8, (1,), generator=gen))] = 0.0  # prompt tokens carry no loss
    mask[1, -int(torch.randint(1, 9, (1,), generator=gen)):] = 0.0  # micro-batches differ in token count
    return {"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": mask,
            "position_ids": torch.arange(S).expand(B, S), "attention_mask": None}


def global_batches() -> list[list[dict]]:
    gen = torch.Generator().manual_seed(0)
    return [[make_batch(gen) for _ in range(MICRO)] for _ in range(STEPS)]


def build(hf: dict, tp: int, distributed: bool):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    chunks = providers.build_model(hf, tp, 1, seed=99, distributed_optimizer=distributed)
    optimizer = ts.build_optimizer(chunks, lr=3e-3, weight_decay=0.01, clip_grad=1.0, min_lr=3e-4,
                                   distributed=distributed)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=3e-3, min_lr=3e-4, lr_warmup_steps=1, lr_decay_steps=STEPS,
        lr_decay_style="cosine", start_wd=0.01, end_wd=0.01, wd_incr_steps=STEPS, wd_incr_style="constant")
    return chunks, optimizer, scheduler


def my_micro_batches(step_batches: list[dict]) -> list[dict]:
    from megatron.core import parallel_state as ps

    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    return [mb for i, mb in enumerate(step_batches) if i % dp == r]


def rank_info(chunks, optimizer) -> dict:
    from megatron.core import parallel_state as ps

    buffers = [buf for c in chunks for buf in c.buffers]
    return {"dp_rank": ps.get_data_parallel_rank(), "dp": ps.get_data_parallel_world_size(),
            "held": ts.held_bytes(chunks, optimizer),
            "grad_buffer_numel": sum(buf.numel for buf in buffers),
            "grad_buffer_numel_unpadded": sum(buf.numel_unpadded for buf in buffers)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--out", required=True)
    parser.add_argument("--save", help="save a checkpoint here after step 3")
    parser.add_argument("--load", help="then load this checkpoint and take steps 4 and 5 (after training, if any)")
    parser.add_argument("--resume-with", default="regular,distributed")
    parser.add_argument("--resume-tp", type=int, help="TP of the resumed runs (default: --tp)")
    parser.add_argument("--no-train", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    hf = providers.load_hf_config(CONFIG)
    runtime.init_distributed(args.tp, 1, seed=1234)
    batches = global_batches()
    report: dict = {}
    if not args.no_train:
        chunks, optimizer, scheduler = build(hf, args.tp, args.distributed_optimizer)
        losses, norms, info = [], [], None
        for step in range(1, STEPS + 1):
            r = ts.optimizer_step(chunks, optimizer, my_micro_batches(batches[step - 1]), S, scheduler=scheduler)
            losses.append(r["loss"])
            norms.append(r["grad_norm"])
            if step == 1:
                info = rank_info(chunks, optimizer)
            if step == SAVE_AT and args.save:
                checkpointing.save_checkpoint(args.save, step, chunks, optimizer, scheduler,
                                              extra={"distributed_optimizer": args.distributed_optimizer})
        ranks = [None] * runtime.world_size()
        torch.distributed.all_gather_object(ranks, info)
        report.update(losses=losses, grad_norms=norms, ranks=ranks)
    if args.load:
        tp = args.resume_tp or args.tp
        if tp != args.tp:  # same processes, another layout
            runtime.init_distributed(tp, 1, seed=1234)
        report["resumed"] = {}
        for kind in args.resume_with.split(","):
            chunks, optimizer, scheduler = build(hf, tp, kind == "distributed")
            step, _ = checkpointing.load_checkpoint(args.load, chunks, optimizer, scheduler)
            losses, norms = [], []
            for s in range(step + 1, STEPS + 1):
                r = ts.optimizer_step(chunks, optimizer, my_micro_batches(batches[s - 1]), S, scheduler=scheduler)
                losses.append(r["loss"])
                norms.append(r["grad_norm"])
            report["resumed"][kind] = {"step": step, "losses": losses, "grad_norms": norms}
    if runtime.rank() == 0:
        Path(args.out).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
    runtime.destroy_distributed()
