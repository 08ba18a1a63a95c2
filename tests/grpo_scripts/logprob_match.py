"""After refit, the rollout engine's log-probs of a fixed completion equal the Megatron policy's.

    python tests/grpo_scripts/logprob_match.py OUT.json [--backend vllm|hf] [--bucketed-pp 1]           # TP=1
    torchrun --nproc_per_node 2 tests/grpo_scripts/logprob_match.py OUT.json --tp 2 [--bucketed-pp 2]  # TP=2

The policy takes a few optimizer steps first (so it is not at its random init), the weights are
gathered through the shared HF mapping and loaded into one engine on rank 0, and rank 0 writes the
largest absolute difference over the completion's tokens.

With --bucketed-pp P the same processes then rebuild megatron's groups as TP=1 x PP=P, train a second policy
(another seed: every weight differs from the first one's) and refit it into the same engine in buckets of
--bucket-mb, with every refit tensor measured by weak reference (`RefitMeter`); the report's "bucketed" entry has
the bucket figures and the engine's log-probs against the second policy's. A tensor the bucketed refit missed
would still hold the first policy's weight.
"""

import argparse
import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

# recipes' modules are imported inside the functions: vLLM's spawned processes re-import this file


def trained_policy(hf: dict, tp: int, pp: int, seed: int, tok, pad_to: int = 1):
    """A policy after 5 SFT steps on task traces (the distribution becomes peaked, so a mapping bug would show);
    returns the model chunks, the sequences and their padded token rows."""
    from recipes import task
    from recipes.megatron import providers, train_step

    chunks = providers.build_model(hf, tp, pp, seed=seed)
    opt = train_step.build_optimizer(chunks, lr=3e-3)
    seqs = [tok.tokenize_conversation([{"role": "user", "content": p.question},
                                       {"role": "assistant", "content": task.assistant_response(p)}])[0]
            for p in task.train_problems([2], 4, seed=0)]
    s = (max(map(len, seqs)) + pad_to - 1) // pad_to * pad_to
    tokens = torch.full((len(seqs), s), tok.pad_id)
    mask = torch.zeros(len(seqs), s)
    for i, q in enumerate(seqs):
        tokens[i, :len(q)] = torch.tensor(q)
        mask[i, :len(q) - 1] = 1
    batch = {"tokens": tokens, "labels": torch.cat([tokens[:, 1:], tokens[:, -1:]], 1), "loss_mask": mask,
             "position_ids": torch.arange(s).expand(len(seqs), s).contiguous(), "attention_mask": None}
    for _ in range(5):
        train_step.optimizer_step(chunks, opt, [batch], s)
    return chunks, seqs, tokens


def whole_refit(backend, hf: dict, tp: int, tok, backend_name: str) -> dict | None:
    from recipes.megatron import train_step
    from recipes.rl.refit import refit

    chunks, seqs, tokens = trained_policy(hf, tp, 1, 0, tok)
    seconds = refit(backend, chunks, hf)
    megatron_lp = train_step.logprobs_of(chunks, tokens)  # collective: every rank
    if backend is None:
        return None
    n = len(seqs[0])
    engine_lp = torch.tensor(backend.prompt_logprobs([seqs[0]])[0])
    diff = (engine_lp - megatron_lp[0, :n - 1]).abs()
    result = {"tp": tp, "backend": backend_name, "tokens": n - 1, "max_abs_diff": float(diff.max()),
              "mean_logprob": float(engine_lp.mean()), "refit_seconds": seconds}
    if hasattr(backend, "_decode_threads"):  # vLLM: its decode thread count, then the trainer's again
        with backend._decode_threads():
            result["decode_threads"] = torch.get_num_threads()
        result["threads_after"] = torch.get_num_threads()
    return result


def bucketed_refit(backend, hf: dict, pp: int, bucket_mb: float, tok) -> dict | None:
    from recipes.megatron import runtime, train_step
    from recipes.rl.refit import RefitMeter, refit

    runtime.init_distributed(1, pp, seed=0)
    chunks, seqs, tokens = trained_policy(hf, 1, pp, 1, tok, pad_to=8)
    before = backend.prompt_logprobs(seqs) if backend is not None else None  # the first policy's
    meter = RefitMeter() if backend is not None else None
    seen = {"buckets": 0, "bytes": 0}  # what the engine receives, counted without holding on to it
    if backend is not None:
        load = backend.load_buckets

        def counting(stream):
            for bucket in stream:
                seen["buckets"] += 1
                seen["bytes"] += sum(t.numel() * t.element_size() for _, t in bucket)
                yield bucket
                del bucket

        backend.load_buckets = lambda stream: load(counting(stream))
    seconds = refit(backend, chunks, hf, bucket_mb, meter)
    gc.collect()
    megatron_lp = train_step.logprobs_of(chunks, tokens)  # collective: every rank
    if backend is None:
        return None
    backend.load_buckets = load
    engine_lp = backend.prompt_logprobs(seqs)
    diffs = [(torch.tensor(e) - megatron_lp[i, :len(q) - 1]).abs().max()
             for i, (e, q) in enumerate(zip(engine_lp, seqs))]
    changed = max(float((torch.tensor(a) - torch.tensor(b)).abs().max()) for a, b in zip(before, engine_lp))
    return {"tp": 1, "pp": pp, "bucket_bytes": int(bucket_mb * 2**20), "units": meter.units,
            "buckets": seen["buckets"], "peak_bytes": meter.peak, "largest_unit_bytes": meter.largest_unit,
            "live_after": meter.live, "model_bytes": seen["bytes"], "refit_seconds": seconds,
            "max_abs_diff": float(max(diffs)), "changed_by_refit": changed,
            "mean_logprob": float(sum(sum(e) for e in engine_lp) / sum(len(e) for e in engine_lp))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--backend", default="vllm")
    parser.add_argument("--bucketed-pp", type=int, help="then a bucketed refit of another policy at TP=1 x PP=this")
    parser.add_argument("--bucket-mb", type=float, default=0.5)
    args = parser.parse_args()

    from recipes import tokenizer
    from recipes.megatron import providers, runtime
    from recipes.rl.refit import write_engine_dir
    from recipes.rl.rollout import RolloutConfig, start_engine

    torch.set_num_threads(1 if args.tp > 1 else 2)
    runtime.init_distributed(args.tp, 1, seed=0)
    hf = providers.load_hf_config("recipes/assets/models/tiny-qwen2/config.json")
    tok = tokenizer.load()
    backend = None
    if runtime.rank() == 0:
        cfg = RolloutConfig(backend=args.backend, kv_cache_mb=64, cpu_threads=1)
        backend = start_engine(cfg, write_engine_dir(hf, Path(args.out).parent / "engine", tok),
                               in_process=runtime.world_size() == 1)
    result = whole_refit(backend, hf, args.tp, tok, args.backend)
    if args.bucketed_pp:
        torch.set_num_threads(1)
        bucketed = bucketed_refit(backend, hf, args.bucketed_pp, args.bucket_mb, tok)
        if result is not None:
            result["bucketed"] = bucketed
    if backend is not None:
        Path(args.out).write_text(json.dumps(result))
        print(json.dumps(result))
        backend.close()
    runtime.destroy_distributed()


if __name__ == "__main__":
    main()
