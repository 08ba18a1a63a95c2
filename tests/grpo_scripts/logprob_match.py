"""After refit, the rollout engine's log-probs of a fixed completion equal the Megatron policy's.

    python tests/grpo_scripts/logprob_match.py OUT.json [--backend vllm|hf]              # TP=1
    torchrun --nproc_per_node 2 tests/grpo_scripts/logprob_match.py OUT.json --tp 2      # TP=2

The policy takes a few optimizer steps first (so it is not at its random init), the weights are
gathered through the shared HF mapping and loaded into one engine on rank 0, and rank 0 writes the
largest absolute difference over the completion's tokens.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--backend", default="vllm")
    args = parser.parse_args()

    from recipes import task, tokenizer
    from recipes.megatron import providers, runtime, train_step
    from recipes.rl.refit import refit, write_engine_dir
    from recipes.rl.rollout import RolloutConfig, start_engine

    torch.set_num_threads(1 if args.tp > 1 else 2)
    runtime.init_distributed(args.tp, 1, seed=0)
    hf = providers.load_hf_config("recipes/assets/models/tiny-qwen2/config.json")
    chunks = providers.build_model(hf, args.tp, 1, seed=0)
    opt = train_step.build_optimizer(chunks, lr=3e-3)
    # a few SFT steps on task traces: the distribution becomes peaked, so a mapping bug would show
    problems = task.train_problems([2], 4, seed=0)
    tok = tokenizer.load()
    seqs = [tok.tokenize_conversation([{"role": "user", "content": p.question},
                                       {"role": "assistant", "content": task.assistant_response(p)}])[0]
            for p in problems]
    s = max(map(len, seqs))
    tokens = torch.full((len(seqs), s), tok.pad_id)
    mask = torch.zeros(len(seqs), s)
    for i, q in enumerate(seqs):
        tokens[i, :len(q)] = torch.tensor(q)
        mask[i, :len(q) - 1] = 1
    batch = {"tokens": tokens, "labels": torch.cat([tokens[:, 1:], tokens[:, -1:]], 1), "loss_mask": mask,
             "position_ids": torch.arange(s).expand(len(seqs), s).contiguous(), "attention_mask": None}
    for _ in range(5):
        train_step.optimizer_step(chunks, opt, [batch], s)

    rank0 = runtime.rank() == 0
    out_dir = Path(args.out).parent
    backend = None
    if rank0:
        cfg = RolloutConfig(backend=args.backend, kv_cache_mb=64, cpu_threads=1)
        backend = start_engine(cfg, write_engine_dir(hf, out_dir / "engine", tok), in_process=runtime.world_size() == 1)
    seconds = refit(backend, chunks, hf)
    megatron_lp = train_step.logprobs_of(chunks, tokens)  # collective: every rank
    if rank0:
        n = len(seqs[0])
        engine_lp = torch.tensor(backend.prompt_logprobs([seqs[0]])[0])
        diff = (engine_lp - megatron_lp[0, :n - 1]).abs()
        result = {"tp": args.tp, "backend": args.backend, "tokens": n - 1, "max_abs_diff": float(diff.max()),
                  "mean_logprob": float(engine_lp.mean()), "refit_seconds": seconds}
        if hasattr(backend, "_decode_threads"):  # vLLM: its decode thread count, then the trainer's again
            with backend._decode_threads():
                result["decode_threads"] = torch.get_num_threads()
            result["threads_after"] = torch.get_num_threads()
        Path(args.out).write_text(json.dumps(result))
        print(json.dumps(result))
        backend.close()
    runtime.destroy_distributed()


if __name__ == "__main__":
    main()
