"""Worker for tests/test_megatron_memory_modes.py: activation recompute and sequence parallelism on the tiny models.

Run as a single process (TP=1) or under `python -m torch.distributed.run --nproc_per_node 2` (TP=2 with sequence
parallelism). Every run loads the same HF weights (`--hf`, written by the first run: the tiny Qwen2 and a Qwen3
variant of it with qk-norm), so losses and gradients are comparable. Rank 0 writes a JSON report to `--out`:

TP=1:
  recompute   per mode (none, selective, full): loss, forward calls of the layers and of core attention during
              one forward+backward, and the max abs difference of every gradient from mode none's (two
              micro-batches: a plain causal one and two sequences packed with a block-diagonal mask)
  train       per model (qwen2, qwen3): the 3 AdamW losses and the norm weights' gradients of step 1's batch
TP=2 (sequence_parallel on):
  train       per run (qwen2, qwen2 + full recompute, qwen2 + selective recompute, qwen3): the same 3 losses,
              the norm weights' gradients of step 1's batch (rank 0's), their max abs difference between the two
              TP ranks, and the tokens a layer norm sees per rank (S/TP when sequence parallelism is on)
  odd_length_error   the message forward_backward raises for S not divisible by TP
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.megatron import hf_mapping, providers, runtime  # noqa: E402
from recipes.megatron import train_step as ts  # noqa: E402
from recipes.megatron.norms import RMSNorm  # noqa: E402
from recipes.megatron.sdpa_attention import SDPADotProductAttention  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "recipes/assets/models/tiny-qwen2/config.json"
S, B = 32, 2


def hf_configs() -> dict[str, dict]:
    qwen2 = providers.load_hf_config(CONFIG)
    qwen3 = dict(qwen2, model_type="qwen3", architectures=["Qwen3ForCausalLM"], attention_bias=False)
    return {"qwen2": qwen2, "qwen3": qwen3}


def write_hf_init(hf: dict, out: Path) -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**hf)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # HF initialises norms to 1: make them differ so their gradients are informative
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(out)


def make_batch(gen: torch.Generator) -> dict:
    tok = torch.randint(0, 262, (B, S + 1), generator=gen)
    mask = torch.ones(B, S)
    mask[:, : int(torch.randint(1, 8, (1,), generator=gen))] = 0.0
    return {"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": mask,
            "position_ids": torch.arange(S).expand(B, S), "attention_mask": None}


def packed_batch(gen: torch.Generator, cu: bool = False) -> dict:
    """Two sequences (20 and 12 tokens) in one row: a block-diagonal causal mask, or `cu_seqlens` for it."""
    tok = torch.randint(0, 262, (1, S + 1), generator=gen)
    seg = torch.tensor([0] * 20 + [1] * 12)[None]
    labels = tok[:, 1:].clone()
    loss_mask = torch.ones(1, S)
    loss_mask[0, 19] = 0.0  # the first sequence's last input has no next token of its own
    batch = {"tokens": tok[:, :-1], "labels": labels, "loss_mask": loss_mask,
             "position_ids": torch.cat([torch.arange(20), torch.arange(12)])[None],
             "attention_mask": ts.packed_attention_mask(seg)}
    if cu:
        batch.update(attention_mask=None, cu_seqlens=ts.cu_seqlens_from_segments(seg))
    return batch


def build(hf: dict, hf_weights: dict, tp: int, **overrides) -> list:
    chunks = providers.build_model(hf, tp, 1, seed=99, config_overrides=providers.memory_overrides(**overrides))
    hf_mapping.load_hf_into_megatron(chunks, hf_weights, hf)
    return chunks


def count_calls(chunks, kind) -> dict:
    counter = {"n": 0}

    def hook(*_):
        counter["n"] += 1

    for module in providers.unwrap(chunks)[0].modules():
        if isinstance(module, kind):
            module.register_forward_pre_hook(hook)
    return counter


def grads(chunks) -> dict[str, torch.Tensor]:
    return {name: p.main_grad.detach().clone() for name, p in providers.unwrap(chunks)[0].named_parameters()}


def norm_grads(chunks) -> dict[str, torch.Tensor]:
    return {name: p.main_grad.detach().clone() for name, p in providers.unwrap(chunks)[0].named_parameters()
            if "norm" in name}


def recompute_report(hf: dict, hf_weights: dict) -> dict:
    from megatron.core.transformer.transformer_layer import TransformerLayer

    gen = torch.Generator().manual_seed(3)
    micro = [make_batch(gen), packed_batch(gen)]
    out, ref = {}, None
    for mode in ("none", "selective", "full"):
        chunks = build(hf, hf_weights, 1, recompute=mode)
        layer_calls = count_calls(chunks, TransformerLayer)
        attention_calls = count_calls(chunks, SDPADotProductAttention)
        loss = ts.forward_backward(chunks, micro, S)["loss"]
        g = grads(chunks)
        ref = g if ref is None else ref
        out[mode] = {"loss": loss, "layer_calls": layer_calls["n"], "attention_calls": attention_calls["n"],
                     "max_abs_grad_diff": max(float((g[k] - ref[k]).abs().max()) for k in ref),
                     "grad_norm": float(torch.cat([v.reshape(-1) for v in g.values()]).norm())}
    return out


def train_report(hf: dict, hf_weights: dict, tp: int, **overrides) -> dict:
    from megatron.core import parallel_state as ps

    chunks = build(hf, hf_weights, tp, **overrides)
    rows = {"n": None}

    def first_norm_input(_module, args):
        rows["n"] = rows["n"] or int(args[0].shape[0])

    next(m for m in providers.unwrap(chunks)[0].modules() if isinstance(m, RMSNorm)).register_forward_pre_hook(
        first_norm_input)
    gen = torch.Generator().manual_seed(0)
    steps = [[make_batch(gen), make_batch(gen)], [make_batch(gen), packed_batch(gen)],
             [packed_batch(gen, cu=True), make_batch(gen)]]
    ts.forward_backward(chunks, steps[0], S)  # the first step's gradients, before clipping
    first = norm_grads(chunks)
    optimizer = ts.build_optimizer(chunks, lr=3e-3, weight_decay=0.01, clip_grad=1.0)
    losses = [ts.optimizer_step(chunks, optimizer, micro, S)["loss"] for micro in steps]
    report = {"losses": losses, "norm_grads": {k: v.tolist() for k, v in first.items()}, "norm_input_rows": rows["n"],
              "sequence_parallel_attr": sorted({str(getattr(p, "sequence_parallel", None)) for n, p in
                                                providers.unwrap(chunks)[0].named_parameters() if "norm" in n})}
    if tp > 1:  # the norm weights' gradients on every TP rank (finalize_model_grads sums their partial sums)
        flat = torch.cat([v.reshape(-1) for v in first.values()])
        gathered = [torch.empty_like(flat) for _ in range(tp)]
        torch.distributed.all_gather(gathered, flat, group=ps.get_tensor_model_parallel_group())
        report["norm_grad_rank_diff"] = max(float((g - gathered[0]).abs().max()) for g in gathered)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--hf", required=True, help="folder of the HF inits (created when missing)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    configs = hf_configs()
    runtime.init_distributed(args.tp, 1, seed=1234)
    if runtime.rank() == 0:
        for name, hf in configs.items():
            if not (Path(args.hf) / name / "model.safetensors").exists():
                write_hf_init(hf, Path(args.hf) / name)
    torch.distributed.barrier()
    weights = {name: hf_mapping.read_hf_weights(Path(args.hf) / name) for name in configs}

    report: dict = {}
    if args.tp == 1:
        report["recompute"] = recompute_report(configs["qwen2"], weights["qwen2"])
        report["train"] = {name: train_report(configs[name], weights[name], 1) for name in configs}
    else:
        runs = {"qwen2": ("qwen2", "none"), "qwen2_full": ("qwen2", "full"),
                "qwen2_selective": ("qwen2", "selective"), "qwen3": ("qwen3", "none")}
        report["train"] = {run: train_report(configs[name], weights[name], args.tp, sequence_parallel=True,
                                             recompute=mode) for run, (name, mode) in runs.items()}
        chunks = build(configs["qwen2"], weights["qwen2"], args.tp, sequence_parallel=True)
        odd = make_batch(torch.Generator().manual_seed(1))
        odd = {k: (v[:, :-1] if isinstance(v, torch.Tensor) else v) for k, v in odd.items()}
        try:
            ts.forward_backward(chunks, [odd], S - 1)
            report["odd_length_error"] = None
        except ValueError as err:
            report["odd_length_error"] = str(err)
    if runtime.rank() == 0:
        Path(args.out).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
    runtime.destroy_distributed()
