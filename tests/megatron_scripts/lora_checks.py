"""Worker for tests/test_lora.py: LoRA on the tiny model at one TP/PP layout.

Every layout starts from the same HF base (`--hf`, written by the first run) and adapters initialised the same
way. `--train` (TP=1, TP=2) then takes 3 AdamW steps on the adapters and saves an adapter checkpoint to `--save`;
`--load` (TP=1, PP=2) loads the checkpoint another layout saved. Rank 0 writes a JSON report to `--out`:
  zero_b_exact        log-probs of the adapted model with B = 0 equal the base model's bitwise
  trainable / frozen_changed / grads_on   parameters with requires_grad (this rank), base values changed by training
                      (must be 0), names of parameters with a gradient buffer
  optimizer_bytes / adapter_numel   held_bytes' optimizer figure and this rank's adapter elements
  merged_vs_unmerged  max |log-prob difference| between the adapted model and a plain model given its merged weights
  refit_is_merged     the weights the vLLM refit streams (stream_hf_units) equal the merged export bitwise
  logprobs_trained    the probe's log-probs after training (or after --load)
  saved_keys          the tensor keys of the adapter checkpoint (--train)
  errors              {case: message} for a base-hash mismatch, an unknown target and too large a rank (TP=1)
With `--export DIR` (TP=1) it also writes DIR/base (HF base), DIR/merged (HF merged) and DIR/adapter (PEFT).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.megatron import checkpointing, hf_checkpoint, hf_mapping, lora, providers, runtime  # noqa: E402
from recipes.megatron import train_step as ts  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "recipes/assets/models/tiny-qwen2/config.json"
S, B = 32, 2
LORA = lora.LoraConfig(enabled=True, r=4, alpha=8.0)


def batch(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, 262, (B, S + 1), generator=gen)
    return {"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": torch.ones(B, S),
            "position_ids": torch.arange(S).expand(B, S), "attention_mask": None}


def probe(chunks) -> torch.Tensor:
    return ts.logprobs_of(chunks, batch(99)["tokens"])


def write_hf_base(hf: dict, out: Path, seed: int = 0) -> None:
    import transformers

    from recipes import tokenizer

    torch.manual_seed(seed)
    hf = {**hf, "initializer_range": 0.1}  # peaked logits: greedy decoding has no near-ties between engines
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf),
                                                          dtype=torch.float32)
    model.save_pretrained(out)
    tokenizer.load(None).save(out)


def plain_from(state: dict, hf: dict, tp: int, pp: int) -> list:
    chunks = providers.build_model(hf, tp, pp, seed=0, ddp=False)
    hf_mapping.load_hf_into_megatron(chunks, state, hf)
    return chunks


def error_cases(hf: dict, base: dict, ckpt: Path, work: Path) -> dict:
    out = {}
    other = work / "hf_other_base"
    if runtime.rank() == 0:
        write_hf_base(hf, other, seed=1)
    runtime.barrier()
    chunks = hf_checkpoint.build_adapted_model(hf, LORA, {**base, "init_checkpoint": str(other)}, 1, 1, ddp=False)
    for case, call in {
        "hash_mismatch": lambda: checkpointing.load_checkpoint(ckpt, chunks),
        "no_match": lambda: lora.apply_lora(providers.build_model(hf, 1, 1, ddp=False),
                                            lora.LoraConfig(enabled=True, target_modules=["q_proj"])),
        "rank_too_large": lambda: lora.apply_lora(providers.build_model(hf, 1, 1, ddp=False),
                                                  lora.LoraConfig(enabled=True, r=100_000)),
    }.items():
        try:
            call()
            out[case] = None
        except ValueError as err:
            out[case] = str(err)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--hf", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--save")
    ap.add_argument("--load")
    ap.add_argument("--export")
    args = ap.parse_args(argv)
    runtime.init_distributed(args.tp, args.pp, seed=0)
    torch.set_num_threads(1)
    hf = providers.load_hf_config(CONFIG)
    hf_dir = Path(args.hf)
    if runtime.rank() == 0 and not (hf_dir / "config.json").exists():
        write_hf_base(hf, hf_dir)
    runtime.barrier()
    report: dict = {}
    base_state = hf_mapping.read_hf_weights(hf_dir)
    base_lp = probe(plain_from(base_state, hf, args.tp, args.pp))
    base = {"init_checkpoint": str(hf_dir), "hf_config": str(CONFIG), "seed": 0}
    chunks = hf_checkpoint.build_adapted_model(hf, LORA, base, args.tp, args.pp)
    report["zero_b_exact"] = bool(torch.equal(probe(chunks), base_lp))
    bare = providers.unwrap(chunks)
    report["trainable"] = sorted({n.rsplit(".", 1)[-1] for m in bare for n, p in m.named_parameters()
                                  if p.requires_grad})
    report["adapter_numel"] = lora.trainable_parameters(chunks)
    if args.train:
        frozen = {n: p.detach().clone() for m in bare for n, p in m.named_parameters() if not p.requires_grad}
        optimizer = ts.build_optimizer(chunks, lr=2e-2, weight_decay=0.0)
        report["losses"] = [ts.optimizer_step(chunks, optimizer, [batch(s)], S)["loss"] for s in range(3)]
        report["frozen_changed"] = sum(not torch.equal(frozen[n], p) for m in bare for n, p in m.named_parameters()
                                       if n in frozen)
        report["grads_on"] = sorted({n.rsplit(".", 1)[-1] for m in bare for n, p in m.named_parameters()
                                     if getattr(p, "main_grad", None) is not None})
        report["optimizer_bytes"] = ts.held_bytes(chunks, optimizer)["optimizer"]
        report["b_nonzero"] = all(bool(m.lora_B.abs().sum() > 0) for c in bare for _, m in lora.adapted_layers(c))
        checkpointing.save_checkpoint(args.save, 3, chunks, optimizer)
        report["saved_keys"] = sorted(__import__("megatron.core.dist_checkpointing", fromlist=["x"])
                                      .load_tensors_metadata(str(checkpointing.step_dir(args.save, 3))))
    if args.load:
        checkpointing.load_checkpoint(args.load, chunks)
    trained = probe(chunks)
    report["logprobs_trained"] = trained.tolist()
    merged_state = hf_mapping.megatron_to_hf(chunks, hf)  # adapters merged into their layers' weights
    # what GRPO's refit sends the rollout engine (rank 0 receives): the same merged weights
    refit = {name: t for unit in hf_mapping.stream_hf_units(chunks, hf) for name, t in unit}
    if runtime.rank() == 0:
        report["refit_is_merged"] = refit.keys() == merged_state.keys() and all(
            torch.equal(refit[k].cpu(), merged_state[k]) for k in refit)
    report["merged_vs_unmerged"] = float((probe(plain_from(merged_state, hf, args.tp, args.pp)) - trained)
                                         .abs().max())
    report["merged_differs_from_base"] = float((trained - base_lp).abs().max())
    if args.pp == 1:
        peft = lora.peft_state_dict(chunks, hf)
        report["peft_keys"] = sorted(peft)[:4]
        report["peft_sum"] = float(sum(v.double().abs().sum() for v in peft.values()))
        if args.export and runtime.rank() == 0:
            export = Path(args.export)
            hf_checkpoint.write_hf_folder(base_state, hf, export / "base")
            hf_checkpoint.write_hf_folder(merged_state, hf, export / "merged")
            lora.write_peft_adapter(export / "adapter", peft, LORA, str(export / "base"))
    if args.tp == 1 and args.pp == 1 and args.load:
        report["errors"] = error_cases(hf, base, Path(args.load), hf_dir.parent)
    if runtime.rank() == 0:
        Path(args.out).write_text(json.dumps(report))
    runtime.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])
