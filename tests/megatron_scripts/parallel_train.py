"""Worker for tests/test_megatron_parallel.py: train the tiny model 3 optimizer steps at one TP/PP layout.

Run as a single process (TP=1) or under `python -m torch.distributed.run --nproc_per_node 2` (TP=2 or PP=2).
Every layout starts from the same HF weights (`--hf`, written by the first run), so losses are comparable.
Rank 0 writes a JSON report to `--out`:
  losses            the 3 training losses
  hf_export_exact   megatron_to_hf right after loading equals the HF weights bitwise (TP/PP gather)
  custom_loss       the same first-step loss through a custom loss_fn using vocab_parallel_log_probs
  logprobs          logprobs_of(...) of a probe batch before training (list of lists)
  eval_loss_loaded  forward-only loss of the eval batch after loading `--load` (a checkpoint of another layout)
  eval_loss_trained forward-only loss of the eval batch after the 3 steps (before any --load)
  hf_reference_loss (TP=1 only) the first batch's loss computed by transformers on the same weights
  packed            (TP=1 only) loss/grad-norm of two sequences packed in one row vs. the same two unpacked
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.megatron import checkpointing, hf_mapping, providers, runtime  # noqa: E402
from recipes.megatron import train_step as ts  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "recipes/assets/models/tiny-qwen2/config.json"
S, B = 32, 2


def make_batch(gen: torch.Generator) -> dict:
    tok = torch.randint(0, 262, (B, S + 1), generator=gen)
    mask = torch.ones(B, S)
    mask[:, : int(torch.randint(1, 8, (1,), generator=gen))] = 0.0  # prompt tokens carry no loss
    mask[1, -5:] = 0.0
    return {"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": mask,
            "position_ids": torch.arange(S).expand(B, S), "attention_mask": None}


def write_hf_init(hf: dict, out: Path) -> None:
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf),
                                                          dtype=torch.float32)
    model.save_pretrained(out)


def hf_reference_loss(hf_dir: Path, batches: list[dict]) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for b in batches:
            logits = model(b["tokens"]).logits
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"].reshape(-1),
                                                   reduction="none").reshape(B, S)
            total += float((ce * b["loss_mask"]).sum())
            count += float(b["loss_mask"].sum())
    return total / count


def packed_check(chunks, hf) -> dict:
    """Two sequences (lengths 20 and 12) as two padded rows vs. packed into one row with a block-diagonal mask."""
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randint(0, 262, (21,), generator=gen), torch.randint(0, 262, (13,), generator=gen)
    pad = 257
    rows = torch.full((2, S + 1), pad)
    rows[0, :21], rows[1, :13] = a, b
    mask = torch.zeros(2, S)
    mask[0, :20], mask[1, :12] = 1, 1
    unpacked = {"tokens": rows[:, :-1], "labels": rows[:, 1:], "loss_mask": mask,
                "position_ids": torch.arange(S).expand(2, S), "attention_mask": None}
    # packed row: a's 20 inputs then b's 12 inputs; labels are each sequence's own next tokens
    tokens = torch.cat([a[:-1], b[:-1]])[None]
    labels = torch.cat([a[1:], b[1:]])[None]
    seg = torch.tensor([0] * 20 + [1] * 12)[None]
    packed = {"tokens": tokens, "labels": labels, "loss_mask": torch.ones(1, S),
              "position_ids": torch.cat([torch.arange(20), torch.arange(12)])[None],
              "attention_mask": ts.packed_attention_mask(seg)}
    packed_cu = dict(packed, attention_mask=None, cu_seqlens=ts.cu_seqlens_from_segments(seg))
    no_mask = dict(packed, attention_mask=None)  # plain causal: b would see a, so the loss must differ
    out = {}
    for name, batch in (("unpacked", unpacked), ("packed", packed), ("packed_cu", packed_cu),
                        ("packed_no_mask", no_mask)):
        for c in chunks:
            c.zero_grad_buffer()
        r = ts.forward_backward(chunks, [batch], S)
        grads = torch.cat([p.main_grad.reshape(-1) for p in chunks[0].parameters()])
        out[name] = {"loss": r["loss"], "num_tokens": r["num_tokens"], "grad_norm": float(grads.norm())}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--hf", required=True, help="HF init folder (created when missing)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--save", help="save a checkpoint here after training")
    parser.add_argument("--load", help="afterwards, load this checkpoint and report the eval loss")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    hf = providers.load_hf_config(CONFIG)
    hf_dir = Path(args.hf)
    runtime.init_distributed(args.tp, args.pp, seed=1234)
    if runtime.rank() == 0 and not (hf_dir / "model.safetensors").exists():
        write_hf_init(hf, hf_dir)
    torch.distributed.barrier()
    hf_weights = hf_mapping.read_hf_weights(hf_dir)

    chunks = providers.build_model(hf, args.tp, args.pp, seed=99)
    hf_mapping.load_hf_into_megatron(chunks, hf_weights, hf)
    exported = hf_mapping.megatron_to_hf(chunks, hf)
    report: dict = {"hf_export_exact": sorted(exported) == sorted(hf_mapping.hf_weight_names(hf))
                    and all(torch.equal(exported[k], hf_weights[k]) for k in exported)}

    gen = torch.Generator().manual_seed(0)
    steps = [[make_batch(gen), make_batch(gen)] for _ in range(3)]
    eval_batch = [make_batch(gen)]
    probe = make_batch(gen)["tokens"]

    report["logprobs"] = ts.logprobs_of(chunks, probe).tolist()

    def custom(logits, batch):
        lp = ts.vocab_parallel_log_probs(logits, batch["labels"])
        return -(lp * batch["loss_mask"]).sum(), batch["loss_mask"].sum()

    report["custom_loss"] = ts.forward_backward(chunks, steps[0], S, forward_only=True, loss_fn=custom)["loss"]
    if args.tp == 1 and args.pp == 1:
        report["hf_reference_loss"] = hf_reference_loss(hf_dir, steps[0])
        report["packed"] = packed_check(chunks, hf)

    optimizer = ts.build_optimizer(chunks, lr=3e-3, weight_decay=0.01, clip_grad=1.0)
    report["losses"] = [ts.optimizer_step(chunks, optimizer, mb, S)["loss"] for mb in steps]
    report["eval_loss_trained"] = ts.forward_backward(chunks, eval_batch, S, forward_only=True)["loss"]
    if args.save:
        checkpointing.save_checkpoint(args.save, 3, chunks, optimizer, extra={"layout": [args.tp, args.pp]})
    if args.load:
        fresh = providers.build_model(hf, args.tp, args.pp, seed=5)
        step, extra = checkpointing.load_checkpoint(args.load, fresh)
        report["loaded_step"], report["loaded_extra"] = step, extra
        report["eval_loss_loaded"] = ts.forward_backward(fresh, eval_batch, S, forward_only=True)["loss"]
    if runtime.rank() == 0:
        Path(args.out).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
    runtime.destroy_distributed()
