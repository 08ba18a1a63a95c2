"""`nrr bench sft`: what sequence packing buys on a corpus — useful-token fraction and training speed — and how
far a training step is from the machine's matmul peak (`recipes.bench.peak`); and LoRA (`lora_r` > 0) against full
fine-tuning of the same model on the same packed rows: trainable parameters, optimizer-state bytes, step time.

    nrr bench sft corpus=runs/curate/corpus.jsonl seq_length=256 steps=5

Both layouts hold the same examples; "useful" tokens are document tokens (not padding). Speed is
measured on real megatron-core training steps of the tiny student (forward, backward, AdamW).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def _throughput(rows: list, seq_length: int, steps: int, micro_batch_size: int, hf_config: str,
                lora_r: int = 0) -> dict:
    from recipes.data.sft_dataset import micro_batches
    from recipes.megatron import lora, providers, runtime, train_step

    runtime.init_distributed(1, 1, seed=0)
    hf = providers.load_hf_config(hf_config)
    if lora_r:  # the same base, frozen, with adapters on every linear layer
        chunks = providers.build_model(hf, 1, 1, seed=0, ddp=False)
        lora.apply_lora(chunks, lora.LoraConfig(enabled=True, r=lora_r, alpha=2.0 * lora_r))
        chunks = providers.wrap_ddp(chunks)
    else:
        chunks = providers.build_model(hf, 1, 1, seed=0)
    optimizer = train_step.build_optimizer(chunks, lr=1e-4)
    per_step = micro_batch_size * 2  # two micro batches per step, as with gradient accumulation
    rows = [rows[i % len(rows)] for i in range(per_step * (steps + 1))]
    times, useful = [], 0
    for k in range(steps + 1):  # the first step warms up and is not timed
        batch_rows = rows[k * per_step:(k + 1) * per_step]
        t0 = time.perf_counter()
        train_step.optimizer_step(chunks, optimizer, micro_batches(batch_rows, micro_batch_size), seq_length)
        if k:
            times.append(time.perf_counter() - t0)
            useful += sum(sum(r.doc_lengths) for r in batch_rows)
    seconds = sum(times)
    held = train_step.held_bytes(chunks, optimizer)
    return {"tokens_per_s": round(per_step * seq_length * steps / seconds, 1),
            "useful_tokens_per_s": round(useful / seconds, 1), "step_s": round(seconds / steps, 4),
            "trainable_params": lora.trainable_parameters(chunks), "optimizer_bytes": held["optimizer"],
            "grad_bytes": held["grads"]}


def bench_sft(corpus: str | None = None, seq_length: int = 256, steps: int = 5, micro_batch_size: int = 8,
              n_per_level: int = 1000, hf_config: str = "recipes/assets/models/tiny-qwen2/config.json",
              speed: bool = True, lora_r: int = 8) -> dict:
    """Useful-token fraction packed vs padded on `corpus` (default: the embedded task's traces, levels 1-3),
    and training tokens/s for a few steps of each layout; with `lora_r` > 0 also LoRA of that rank on the packed
    rows ("lora", next to full fine-tuning's "packed")."""
    import torch

    from recipes import tokenizer
    from recipes.data import sft_dataset as sd
    from recipes.data.packing import useful_fraction
    from recipes.megatron import providers
    from recipes.config import resolve_path

    torch.set_num_threads(2)
    hf_config = str(resolve_path(hf_config))
    if corpus is None:
        tmp = Path(tempfile.mkdtemp(prefix="nrr-bench-sft-"))
        corpus = str(sd.write_records(sd.task_records([1, 2, 3], n_per_level, seed=0), tmp / "corpus.jsonl"))
    vocab = int(providers.load_hf_config(hf_config)["vocab_size"])
    cfg = sd.DataConfig(seq_length=seq_length, on_bad_record="skip")
    t0 = time.perf_counter()
    tok = tokenizer.load(hf_config)  # the tokenizer beside the config
    examples, stats = sd.load_examples(corpus, cfg, vocab, tok)
    tokenize_s = time.perf_counter() - t0
    result: dict = {"corpus": corpus, "seq_length": seq_length, "examples": len(examples),
                    "skipped": stats.skipped, "tokenize_s": round(tokenize_s, 3)}
    from recipes.bench.peak import best_peak, matmul_peak, model_gflops

    peak_before = matmul_peak() if speed else None  # read again after the steps: the best reading is the peak
    for name, packing in (("packed", True), ("padded", False)):
        t0 = time.perf_counter()
        rows = sd.build_rows(examples, seq_length, packing, tok.pad_id)
        result[name] = {"rows": len(rows), "useful_token_fraction": round(useful_fraction(rows), 4),
                        "build_s": round(time.perf_counter() - t0, 3)}
        if speed:
            result[name].update(_throughput(rows, seq_length, steps, micro_batch_size, hf_config))
    result["rows_saved_by_packing"] = round(1 - result["packed"]["rows"] / result["padded"]["rows"], 4)
    if speed and lora_r:
        rows = sd.build_rows(examples, seq_length, True, tok.pad_id)
        result["lora"] = {"r": lora_r, **_throughput(rows, seq_length, steps, micro_batch_size, hf_config, lora_r)}
        full = result["packed"]
        result["lora_vs_full"] = {
            "trainable_params": [result["lora"]["trainable_params"], full["trainable_params"]],
            "optimizer_bytes": [result["lora"]["optimizer_bytes"], full["optimizer_bytes"]],
            "step_s": [result["lora"]["step_s"], full["step_s"]]}
    if speed:
        result["useful_tokens_per_s_speedup"] = round(
            result["packed"]["useful_tokens_per_s"] / result["padded"]["useful_tokens_per_s"], 2)
        # the step against the machine's limit: model FLOP/s (padding included: the model computes on it) over
        # the fp32 matmul peak on the same threads (the bench trains the fp32 tiny model)
        result["matmul_peak_gflops"] = peak = best_peak(peak_before, matmul_peak())
        hf = providers.load_hf_config(hf_config)
        for name in ("packed", "padded"):
            r = result[name]
            r["model_gflops"] = model_gflops(hf, r["tokens_per_s"], seq_length)
            r["of_fp32_peak"] = round(r["model_gflops"] / peak["float32"], 4)
    from recipes.megatron import runtime

    runtime.destroy_distributed()
    return result
