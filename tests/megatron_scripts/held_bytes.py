"""Worker for tests/test_planner.py: build the tiny model and its optimizer at one layout, take one step, and
report the bytes this rank actually holds next to the planner's figures for the same rank.

Bytes held are summed over distinct storages (views of one buffer count once):
  params     storages of the model's parameters (with the distributed optimizer: megatron's padded param buffer)
  grads      storages of the parameters' `main_grad` (megatron's fp32 DDP grad buffers, padding included)
  optimizer  storages of the tensors the optimizer keeps beyond those two: Adam's exp_avg / exp_avg_sq and fp32
             main weights (the scalar step counters are not state of the model's size and are left out)
`--layouts` is a comma-separated list run one after another in the same processes (the process groups are rebuilt
for each): tp1, tp2, pp2, dp2 (the world size fills DP), a `-distopt` suffix for the distributed optimizer and a
`-bf16` suffix for bf16 parameters. Run one process, or under `python -m torch.distributed.run
--nproc_per_node 2`. Each rank writes `<out>.<rank>.json`: {layout: report}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes import planner  # noqa: E402
from recipes.megatron import providers, runtime  # noqa: E402
from recipes.megatron import train_step as ts  # noqa: E402


def storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        out[st.data_ptr()] = st.nbytes()
    return out


def held(chunks, optimizer) -> dict[str, int]:
    """Bytes this rank holds in parameters, gradient buffers and optimizer state (see the module doc)."""
    params = [p for c in providers.unwrap(chunks) for p in c.parameters()]
    held_params = storages(params)
    held_grads = storages([getattr(p, "main_grad", None) for p in params])
    state_tensors = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = opt.optimizer
        for group in torch_opt.param_groups:
            state_tensors += list(group["params"])
        for st in torch_opt.state.values():
            state_tensors += [v for v in st.values() if torch.is_tensor(v) and v.numel() > 1]
    held_opt = {k: v for k, v in storages(state_tensors).items() if k not in held_params and k not in held_grads}
    return {"params": sum(held_params.values()), "grads": sum(held_grads.values()),
            "optimizer": sum(held_opt.values())}


def measure(hf: dict, name: str) -> dict:
    from megatron.core import parallel_state as ps

    parts = name.split("-")
    tp = int(parts[0][2:]) if parts[0].startswith("tp") else 1
    pp = int(parts[0][2:]) if parts[0].startswith("pp") else 1
    distributed = "distopt" in parts
    precision = "bf16" if "bf16" in parts else "fp32"
    runtime.init_distributed(tp, pp, seed=0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    chunks = providers.build_model(hf, tp, pp, seed=0, dtype=dtype, distributed_optimizer=distributed)
    optimizer = ts.build_optimizer(chunks, lr=1e-3, distributed=distributed)
    s, b = 16, 2
    gen = torch.Generator().manual_seed(0)
    tok = torch.randint(0, int(hf["vocab_size"]), (b, s + 1), generator=gen)
    batch = {"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": torch.ones(b, s),
             "position_ids": torch.arange(s).expand(b, s), "attention_mask": None}
    ts.optimizer_step(chunks, optimizer, [batch], s)

    model = providers.unwrap(chunks)[0]
    saved = saved_bytes(model, batch) if pp == 1 else None

    dp = ps.get_data_parallel_world_size()
    layout = planner.Layout(tp=tp, pp=pp, dp=dp, distributed_optimizer=distributed)
    pp_rank, dp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank()
    return {
        "measured": held(chunks, optimizer),
        "planned": planner.state_bytes(hf, layout, pp_rank, dp_rank, precision),
        "names": [[n, p.numel()] for n, p in model.named_parameters()],
        "planned_names": [list(x) for x in planner.rank_parameters(hf, tp, pp, pp_rank)],
        "saved": saved,
    }


def saved_bytes(model, batch) -> dict[str, int]:
    """Bytes the forward of one micro batch keeps for backward (distinct storages, parameters left out), by
    dtype: what `planner.activation_bytes_per_layer` and the logits term estimate."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, tuple[int, str]] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            kept[st.data_ptr()] = (st.nbytes(), str(t.dtype).replace("torch.", ""))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    out: dict[str, int] = {}
    for nbytes, dtype in kept.values():
        out[dtype] = out.get(dtype, 0) + nbytes
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--layouts", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    hf = providers.load_hf_config(args.config)
    reports = {name: measure(hf, name) for name in args.layouts.split(",")}
    Path(f"{args.out}.{runtime.rank()}.json").write_text(json.dumps(reports))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        runtime.destroy_distributed()
