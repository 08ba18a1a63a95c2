"""Named SFT recipes: config factories for real models on H100 nodes, and a per-GPU memory estimate.

    from recipes.named_recipes import qwen25_7b_sft, estimate_memory
    cfg = qwen25_7b_sft(nodes=2, train_path="/data/traces.parquet")
    estimate_memory(cfg)  # {'params_gib': ..., 'total_gib': ...}

A factory returns a complete `SFTConfig` (model, data, parallel layout, batch, optimizer schedule,
checkpointing); launching it is a separate concern (`nrr sft --config ...`, or NeMo-Run). The
layouts keep one tensor-parallel group inside a node (NVLink) and grow data parallelism with nodes.
The architectures are the published ones (`recipes/assets/models/<name>/config.json`).
"""

from __future__ import annotations

import math
from pathlib import Path

from recipes.data.sft_dataset import DataConfig
from recipes.trainer import (CheckpointConfig, LoggingConfig, ModelConfig, ParallelConfig, SFTConfig,
                             TrainingConfig, ValidationConfig, resolve_batch)

ASSETS = Path(__file__).resolve().parent / "assets" / "models"
GIB = 1024**3


def _layout(nodes: int, gpus_per_node: int, tp: int, pp: int) -> ParallelConfig:
    world = nodes * gpus_per_node
    if world % (tp * pp):
        raise ValueError(f"{nodes} node(s) x {gpus_per_node} GPUs is not divisible by tp*pp = {tp}*{pp}")
    if tp > gpus_per_node:
        raise ValueError(f"tp={tp} would span nodes ({gpus_per_node} GPUs per node)")
    return ParallelConfig(tp=tp, pp=pp, dp=world // (tp * pp), nodes=nodes)


def _sft_config(name: str, run_name: str, nodes: int, gpus_per_node: int, tp: int, pp: int, seq_length: int,
                micro_batch_size: int, global_batch_size: int, lr: float, train_path: str | None,
                max_steps: int) -> SFTConfig:
    parallel = _layout(nodes, gpus_per_node, tp, pp)
    step = micro_batch_size * parallel.dp
    gbs = max(step, math.ceil(global_batch_size / step) * step)  # keep the batch a multiple of mbs*dp
    cfg = SFTConfig(
        output_dir=f"runs/{run_name}",
        model=ModelConfig(hf_config=f"recipes/assets/models/{name}/config.json"),
        data=DataConfig(train_path=train_path, seq_length=seq_length, packing=True, on_bad_record="skip"),
        parallel=parallel,
        training=TrainingConfig(global_batch_size=gbs, micro_batch_size=micro_batch_size, lr=lr, min_lr=lr / 10,
                                warmup_steps=min(100, max_steps // 10), weight_decay=0.01, adam_beta2=0.95,
                                grad_clip=1.0, max_steps=max_steps, precision="bf16", threads=None),
        validation=ValidationConfig(every_steps=200, max_rows=256),
        checkpoint=CheckpointConfig(every_steps=200, keep_last=2, resume=True),
        logging=LoggingConfig(every_steps=10, tensorboard=True, progress=False),
    )
    resolve_batch(cfg)
    return cfg


def qwen25_1p5b_sft(nodes: int = 1, gpus_per_node: int = 8, seq_length: int = 8192, tp: int = 1, pp: int = 1,
                    micro_batch_size: int = 1, global_batch_size: int = 128, lr: float = 1e-5,
                    train_path: str | None = None, max_steps: int = 2000) -> SFTConfig:
    """Qwen2.5-1.5B: fits one H100 per replica, so pure data parallelism."""
    return _sft_config("qwen2.5-1.5b", "qwen2.5-1.5b-sft", nodes, gpus_per_node, tp, pp, seq_length,
                       micro_batch_size, global_batch_size, lr, train_path, max_steps)


def qwen25_7b_sft(nodes: int = 2, gpus_per_node: int = 8, seq_length: int = 8192, tp: int = 4, pp: int = 1,
                  micro_batch_size: int = 1, global_batch_size: int = 128, lr: float = 1e-5,
                  train_path: str | None = None, max_steps: int = 2000) -> SFTConfig:
    """Qwen2.5-7B: TP=4 inside a node (Adam states are replicated across DP: the trainer has no distributed
    optimizer yet, and at TP=2 they alone would take 42 GiB per GPU)."""
    return _sft_config("qwen2.5-7b", "qwen2.5-7b-sft", nodes, gpus_per_node, tp, pp, seq_length,
                       micro_batch_size, global_batch_size, lr, train_path, max_steps)


def llama31_8b_sft(nodes: int = 2, gpus_per_node: int = 8, seq_length: int = 8192, tp: int = 4, pp: int = 1,
                   micro_batch_size: int = 1, global_batch_size: int = 128, lr: float = 1e-5,
                   train_path: str | None = None, max_steps: int = 2000) -> SFTConfig:
    """Llama-3.1-8B: TP=4 inside a node (untied 128k-vocab embedding and output layer are sharded too; Adam
    states replicated across DP, as for Qwen2.5-7B)."""
    return _sft_config("llama3.1-8b", "llama3.1-8b-sft", nodes, gpus_per_node, tp, pp, seq_length,
                       micro_batch_size, global_batch_size, lr, train_path, max_steps)


NAMED_RECIPES = {"qwen2.5-1.5b": qwen25_1p5b_sft, "qwen2.5-7b": qwen25_7b_sft, "llama3.1-8b": llama31_8b_sft}


# ------------------------------------------------------------------------------ memory estimate


def param_counts(hf: dict) -> dict[str, int]:
    """Parameter counts by part: 'embedding', 'output' (0 when tied), 'layer' (one decoder layer, of which
    'layer_norms' are replicated across TP, the rest sharded), 'final_norm'."""
    h, f = hf["hidden_size"], hf["intermediate_size"]
    nh = hf["num_attention_heads"]
    nkv = hf.get("num_key_value_heads") or nh
    hd = hf.get("head_dim") or h // nh
    qkv_bias = hf["model_type"] == "qwen2" or bool(hf.get("attention_bias"))
    attn = h * (nh + 2 * nkv) * hd + nh * hd * h + (nh + 2 * nkv) * hd * qkv_bias
    if hf["model_type"] == "qwen3":
        attn += 2 * hd  # q/k norms
    mlp = 3 * h * f  # gate, up, down (SwiGLU)
    vocab = hf["vocab_size"]
    return {"embedding": vocab * h, "output": 0 if hf.get("tie_word_embeddings") else vocab * h,
            "layer": attn + mlp + 2 * h, "layer_norms": 2 * h, "final_norm": h}


def activation_bytes_per_layer(hf: dict, seq_length: int, micro_batch_size: int, tp: int) -> float:
    """Activations one decoder layer keeps for backward, in bf16, flash attention, no recompute, no
    sequence parallelism: layer and norm inputs are replicated across TP, the rest is sharded.

    Saved per token: 2 RMSNorm inputs + QKV input + MLP input (h each, replicated); Q, K, V; the
    attention output (o-proj input); gate and up outputs and their SwiGLU product (f each, sharded).
    """
    h, f = hf["hidden_size"], hf["intermediate_size"]
    nh = hf["num_attention_heads"]
    nkv = hf.get("num_key_value_heads") or nh
    hd = hf.get("head_dim") or h // nh
    replicated = 4 * h
    sharded = (nh + 2 * nkv) * hd + nh * hd + 3 * f
    return 2.0 * seq_length * micro_batch_size * (replicated + sharded / tp)


def estimate_memory(cfg: SFTConfig) -> dict[str, float]:
    """Per-GPU memory (GiB) of the most loaded pipeline stage, for bf16 mixed-precision training.

    params: bf16 weights (2 B/param); grads: fp32 main grads (4 B); adam: fp32 master weights, m and
    v (12 B), replicated on every DP rank (the trainer's optimizer is not distributed); activations: 1F1B keeps min(pp, micro
    batches) micro batches in flight on the first stage, i.e. about num_layers layers' worth in all,
    plus the fp32 logits and their softmax on the last stage.
    """
    from recipes.megatron.providers import load_hf_config
    from recipes.config import resolve_path

    hf = load_hf_config(resolve_path(cfg.model.hf_config))
    p = cfg.parallel
    tp, pp, dp = p.tp, p.pp, p.dp
    counts = param_counts(hf)
    layers = hf["num_hidden_layers"] // pp
    per_layer = (counts["layer"] - counts["layer_norms"]) / tp + counts["layer_norms"]
    _, grad_acc = resolve_batch(cfg)
    # the last stage holds the output layer; with tied embeddings and PP > 1 it keeps its own copy
    output = counts["output"] or (counts["embedding"] if pp > 1 else 0)
    first = counts["embedding"] / tp + layers * per_layer
    last = output / tp + layers * per_layer + counts["final_norm"]
    stage_params = first + output / tp + counts["final_norm"] if pp == 1 else max(first, last)
    in_flight = min(pp, grad_acc)
    seq, mbs = cfg.data.seq_length, cfg.training.micro_batch_size
    act = activation_bytes_per_layer(hf, seq, mbs, tp) * layers * in_flight
    logits = seq * mbs * hf["vocab_size"] / tp * (2 + 4 + 4)  # bf16 logits, fp32 copy, fp32 softmax grad
    out = {
        "params_per_gpu": stage_params,
        "params_gib": stage_params * 2 / GIB,
        "grads_gib": stage_params * 4 / GIB,
        "adam_gib": stage_params * 12 / GIB,
        "activations_gib": (act + logits) / GIB,
    }
    out["total_gib"] = out["params_gib"] + out["grads_gib"] + out["adam_gib"] + out["activations_gib"]
    return out


def describe(cfg: SFTConfig) -> str:
    rows, grad_acc = resolve_batch(cfg)
    mem = estimate_memory(cfg)
    p = cfg.parallel
    return (f"{cfg.model.hf_config}: {p.nodes} node(s), TP={p.tp} PP={p.pp} DP={p.dp}, seq {cfg.data.seq_length}, "
            f"micro batch {cfg.training.micro_batch_size}, global batch {rows} rows ({rows * cfg.data.seq_length:,} "
            f"tokens, grad accumulation {grad_acc}); ~{mem['total_gib']:.1f} GiB per GPU "
            f"(params {mem['params_gib']:.1f}, grads {mem['grads_gib']:.1f}, adam {mem['adam_gib']:.1f}, "
            f"activations {mem['activations_gib']:.1f})")


def write_yaml(cfg: SFTConfig, path: str | Path) -> Path:
    from recipes.config import save_config

    return save_config(cfg, path)


if __name__ == "__main__":
    for name, factory in NAMED_RECIPES.items():
        for nodes in (1, 2, 4, 8):
            print(f"{name} nodes={nodes}: {describe(factory(nodes=nodes))}")
