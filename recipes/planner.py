"""Per-GPU memory planner for megatron-core training (SFT, KD, GRPO) and a layout search.

    from recipes.planner import Layout, plan, search, plan_table
    plan(hf, Layout(tp=4, dp=4, distributed_optimizer=True), seq_length=16384)   # bytes per rank, by part
    search(hf, seq_length=16384, nodes=2, global_batch=128)                        # fitting layouts, best first
    print(plan_table(cfg))                                                         # a stage config's layout

Offers:
- `Layout`: tp, pp, cp, dp, distributed_optimizer, sequence_parallel, recompute, micro_batch_size.
- `rank_parameters(hf, tp, pp, pp_rank) -> [(name, numel)]`: the parameters one rank holds, in megatron-core's
  order and with its names (local layer spec), so that the byte figures below can be compared with a real model.
- `state_bytes(hf, layout, pp_rank, precision) -> {params, grads, optimizer}`: what one rank holds, exactly as
  megatron-core lays it out: parameters in the model dtype (with the distributed optimizer, one padded buffer);
  gradients in fp32 DDP buffers (`grad_reduce_in_fp32`; padded as megatron pads them for the distributed
  optimizer: each parameter starts at a multiple of 64 elements, each bucket ends at a multiple of lcm(DP, 128),
  a tied embedding gets its own bucket); optimizer: Adam's exp_avg and exp_avg_sq in fp32, plus fp32 main
  weights for bf16 parameters; with the distributed optimizer only this DP rank's shard of each bucket.
- `activation_bytes_per_layer(...)`, `plan(...) -> Plan` (every part of the most loaded rank, in bytes),
  `search(...) -> [Plan]`, `plan_table(cfg) -> str` and `search_config(cfg)` (SFT / KD / GRPO configs),
  `plans_table(plans)`, `check_fits(cfg)`. `nrr plan` prints them.

Activations follow Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models"
(MLSys 2023, arXiv:2205.05198, section 4 and table 2), written for this model family (GQA attention, SwiGLU MLP,
RMSNorm, no dropout, so no dropout masks) instead of the paper's GPT (MHA, 4h GELU MLP, LayerNorm, dropout).
Per token of one micro batch and one layer, in the compute dtype:
- no recompute: the two norm inputs and the two norm outputs feeding the QKV and MLP projections (4h, replicated
  across TP unless sequence parallelism splits them by TP: the paper's "10 sbh -> 10 sbh / t" term), Q, K and V
  ((n_heads + 2 n_kv) d_head / t), the attention output ((n_heads d_head) / t), the gate and up projections and
  their SwiGLU product (3 f / t); plus, without a fused (flash) attention kernel, the scores and their softmax
  (2 * n_heads * s / t per token: the paper's 5as/h term without the dropout mask);
- selective recompute (core attention recomputed): the same without the scores term;
- full recompute (every layer from its input): only the layer input (h, or h / t with sequence parallelism), and
  one layer's worth of the above while that layer is recomputed in backward.
The 1F1B schedule keeps min(PP, micro batches) micro batches in flight on the first stage; context parallelism
divides the tokens per rank by CP. The last stage also holds the logits of a micro batch (V / TP columns): the fp32
copy the loss keeps for backward (its softmax gradient is computed in place there) and, in backward, the gradient
in the model dtype flowing into the output layer; the model-dtype logits themselves are not kept.
Checked against CUDA's allocator on an H200 (docs/planner-on-gpu.md): the parameter, gradient and optimizer bytes
exactly; activations and logits within the figures recorded there.
"""

from __future__ import annotations

import dataclasses
import math

GIB = 1024**3
H100_GIB = 80.0
# what a plan may use of a GPU: the rest is for the CUDA context, NCCL buffers and allocator fragmentation
USABLE_FRACTION = 0.9
RECOMPUTE_MODES = ("none", "selective", "full")
GRPO_PROMPT_TOKENS = 1024  # GRPO rows are a prompt and its response: the plan assumes prompts up to this long


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    distributed_optimizer: bool = False
    sequence_parallel: bool = False
    recompute: str = "none"
    micro_batch_size: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def describe(self) -> str:
        extras = [f"recompute={self.recompute}"] + (["SP"] if self.sequence_parallel else []) + \
            (["dist-opt"] if self.distributed_optimizer else [])
        return f"TP{self.tp} PP{self.pp} CP{self.cp} DP{self.dp} mbs{self.micro_batch_size} " + " ".join(extras)


# ------------------------------------------------------------------------------ parameters, exactly


def _shape(hf: dict) -> dict:
    h, nh = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    nkv = int(hf.get("num_key_value_heads") or nh)
    return {"h": h, "f": int(hf["intermediate_size"]), "nh": nh, "nkv": nkv,
            "hd": int(hf.get("head_dim") or h // nh), "layers": int(hf["num_hidden_layers"]),
            "vocab": int(hf["vocab_size"]), "tied": bool(hf.get("tie_word_embeddings", False)),
            "qkv_bias": hf.get("model_type") == "qwen2" or bool(hf.get("attention_bias", False)),
            "qk_norm": hf.get("model_type") == "qwen3"}


def check_divides(hf: dict, tp: int, pp: int) -> None:
    """The layout must split the model: attention and KV heads by TP, layers by PP (ValueError naming them)."""
    s = _shape(hf)
    if s["nh"] % tp or s["nkv"] % tp:
        raise ValueError(f"tp={tp} does not divide num_attention_heads={s['nh']} / num_key_value_heads={s['nkv']}")
    if s["layers"] % pp:
        raise ValueError(f"pp={pp} does not divide num_hidden_layers={s['layers']}")


def rank_parameters(hf: dict, tp: int = 1, pp: int = 1, pp_rank: int = 0) -> list[tuple[str, int]]:
    """(name, numel) of every parameter one rank of pipeline stage `pp_rank` holds, in `named_parameters()` order
    of megatron-core's GPTModel with the local layer spec (the embedding's vocab padded to a multiple of TP)."""
    check_divides(hf, tp, pp)
    s = _shape(hf)
    h, hd = s["h"], s["hd"]
    vocab = math.ceil(s["vocab"] / tp) * tp
    per_stage = s["layers"] // pp
    first, last = pp_rank == 0, pp_rank == pp - 1
    out: list[tuple[str, int]] = []
    if first:
        out.append(("embedding.word_embeddings.weight", vocab // tp * h))
    qkv = (s["nh"] + 2 * s["nkv"]) * hd // tp
    for i in range(per_stage):
        p = f"decoder.layers.{i}."
        out.append((p + "input_layernorm.weight", h))
        out.append((p + "self_attention.linear_proj.weight", h * s["nh"] * hd // tp))
        out.append((p + "self_attention.linear_qkv.weight", qkv * h))
        if s["qkv_bias"]:
            out.append((p + "self_attention.linear_qkv.bias", qkv))
        if s["qk_norm"]:
            out.append((p + "self_attention.q_layernorm.weight", hd))
            out.append((p + "self_attention.k_layernorm.weight", hd))
        out.append((p + "pre_mlp_layernorm.weight", h))
        out.append((p + "mlp.linear_fc1.weight", 2 * s["f"] // tp * h))
        out.append((p + "mlp.linear_fc2.weight", h * s["f"] // tp))
    if last:
        out.append(("decoder.final_layernorm.weight", h))
        # a tied output layer reuses the embedding on one stage; with PP the last stage keeps its own copy
        if not s["tied"] or pp > 1:
            out.append(("output_layer.weight", vocab // tp * h))
    return out


def _bucket_layout(params: list[tuple[str, int]], dp: int, distributed_optimizer: bool,
                   tied_embedding: bool) -> tuple[int, list[tuple[int, int]], dict[str, tuple[int, int]]]:
    """megatron-core's `_ParamAndGradBuffer` layout with one bucket (no overlapped reduction): parameters in
    reverse order; with the distributed optimizer each parameter starts at a multiple of 64 elements, each bucket
    ends at a multiple of lcm(DP, 128), and a shared (tied) embedding gets a bucket of its own.
    Returns (buffer numel, bucket (start, end) list, name -> (start, end))."""
    def pad(n: int, d: int) -> int:
        return math.ceil(n / d) * d

    divisor = math.lcm(dp, 128)
    start = bucket_start = 0
    buckets, index, in_bucket = [], {}, 0
    end = 0
    for name, numel in params[::-1]:
        shared = distributed_optimizer and tied_embedding and name in ("embedding.word_embeddings.weight",
                                                                         "output_layer.weight")
        if distributed_optimizer:
            start = pad(start, 64)
        if shared and in_bucket:
            bucket_end = pad(start, divisor)
            buckets.append((bucket_start, bucket_end))
            start = bucket_start = bucket_end
            in_bucket = 0
        end = start + numel
        index[name] = (start, end)
        in_bucket += 1
        if shared:
            bucket_end = pad(end, divisor)
            buckets.append((bucket_start, bucket_end))
            start = bucket_start = bucket_end
            in_bucket = 0
        else:
            start = end
    if in_bucket:
        bucket_end = pad(end, divisor) if distributed_optimizer else end
        buckets.append((bucket_start, bucket_end))
    total = buckets[-1][1] if buckets else 0
    return total, buckets, index


def state_bytes(hf: dict, layout: Layout, pp_rank: int = 0, dp_rank: int = 0, precision: str = "bf16") -> dict:
    """Bytes of parameters, gradients and optimizer state held by one rank (see the module doc)."""
    params = rank_parameters(hf, layout.tp, layout.pp, pp_rank)
    tied = bool(hf.get("tie_word_embeddings", False)) and layout.pp > 1
    numel = sum(n for _, n in params)
    pbytes = 2 if precision == "bf16" else 4
    total, buckets, index = _bucket_layout(params, layout.dp, layout.distributed_optimizer, tied)
    main_weights = 4 if precision == "bf16" else 0  # fp32 params are their own main weights
    if not layout.distributed_optimizer:
        return {"params": numel * pbytes, "grads": total * 4, "optimizer": numel * (8 + main_weights)}
    # this DP rank's shard of every bucket; state exists only where the shard covers a parameter (not padding)
    owned = 0
    for b_start, b_end in buckets:
        shard = (b_end - b_start) // layout.dp
        lo, hi = b_start + dp_rank * shard, b_start + (dp_rank + 1) * shard
        owned += sum(max(0, min(e, hi) - max(s, lo)) for s, e in index.values() if b_start <= s < b_end)
    return {"params": total * pbytes, "grads": total * 4, "optimizer": owned * (8 + main_weights)}


# ------------------------------------------------------------------------------ activations


def activation_bytes_per_layer(hf: dict, seq_length: int, micro_batch_size: int, layout: Layout,
                               dtype_bytes: int = 2, flash_attention: bool = True) -> float:
    """Bytes one decoder layer keeps for backward for one micro batch (the module doc gives the terms)."""
    s = _shape(hf)
    t = layout.tp
    tokens = seq_length * micro_batch_size / layout.cp
    split = t if layout.sequence_parallel else 1
    if layout.recompute == "full":
        return dtype_bytes * tokens * s["h"] / split
    sharded = ((s["nh"] + 2 * s["nkv"]) * s["hd"] + s["nh"] * s["hd"] + 3 * s["f"]) / t
    per_token = 4 * s["h"] / split + sharded
    if layout.recompute == "none" and not flash_attention:
        per_token += 2 * s["nh"] * (seq_length / layout.cp) / t
    return dtype_bytes * tokens * per_token


# ------------------------------------------------------------------------------ plans


@dataclasses.dataclass
class Plan:
    layout: Layout
    seq_length: int
    parts: dict[str, float]  # bytes on the most loaded rank, by part
    grad_accumulation: int = 1
    note: str = ""

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    def fits(self, limit_gib: float = H100_GIB) -> bool:
        return self.total_gib <= limit_gib * USABLE_FRACTION

    def gib(self) -> dict[str, float]:
        return {k: v / GIB for k, v in self.parts.items()}


def lora_state_bytes(hf: dict, layout: Layout, r: int, precision: str = "bf16") -> dict:
    """One rank's bytes with LoRA of rank `r` on every linear layer of a frozen base (recipes/megatron/lora.py): the
    base's parameters, and gradients and Adam state (plus fp32 main weights for bf16) for the adapters only; each
    adapter split over TP as its layer is (A whole and B split for qkv/fc1, A split and B whole for proj/fc2)."""
    s = _shape(hf)
    pbytes = 2 if precision == "bf16" else 4
    h, f, tp = int(hf["hidden_size"]), int(hf["intermediate_size"]), layout.tp
    heads, groups = int(hf["num_attention_heads"]), int(hf.get("num_key_value_heads") or hf["num_attention_heads"])
    hd = int(hf.get("head_dim") or h // heads)
    per_layer = r * (h + (heads + 2 * groups) * hd // tp) + r * (heads * hd // tp + h) \
        + r * (h + 2 * f // tp) + r * (f // tp + h)
    adapters = per_layer * (s["layers"] // layout.pp)
    base = max(sum(n for _, n in rank_parameters(hf, tp, layout.pp, p)) for p in sorted({0, layout.pp - 1}))
    main_weights = 4 if precision == "bf16" else 0
    return {"params": (base + adapters) * pbytes, "grads": adapters * 4, "optimizer": adapters * (8 + main_weights)}


def plan(hf: dict, layout: Layout, seq_length: int, grad_accumulation: int = 1, precision: str = "bf16",
         flash_attention: bool = True, teacher_hf: dict | None = None, engine: dict | None = None,
         reference_model: bool = False, lora_r: int = 0) -> Plan:
    """Bytes per rank on the most loaded pipeline stage.

    `teacher_hf` (KD): a frozen teacher with the student's layout, its parameters and its vocab-parallel logits
    (one micro batch's without pipeline parallelism, every micro batch's of a step with it). `reference_model` (GRPO with a KL term): a
    frozen copy of the policy. `engine` (GRPO, the rollout engine on the trainer's GPUs): {"tp": engine TP,
    "gpu_memory_utilization": the share vLLM reserves, "sleep": whether it sleeps while the trainer trains}; its
    weights and one row's KV cache must fit that share; without sleep the share adds to the trainer's memory."""
    check_divides(hf, layout.tp, layout.pp)
    s = _shape(hf)
    dtype_bytes = 2 if precision == "bf16" else 4
    best: dict | None = None
    for pp_rank in sorted({0, layout.pp - 1}):
        state = state_bytes(hf, layout, pp_rank, 0, precision)
        if lora_r:  # LoRA: the base frozen (no gradient buffer, no Adam state), the adapters trained
            state = lora_state_bytes(hf, layout, lora_r, precision)
        in_flight = min(layout.pp - pp_rank, grad_accumulation)
        act = activation_bytes_per_layer(hf, seq_length, layout.micro_batch_size, layout, dtype_bytes,
                                         flash_attention) * (s["layers"] // layout.pp) * in_flight
        if layout.recompute == "full":  # one layer rebuilt at a time during backward
            act += activation_bytes_per_layer(hf, seq_length, layout.micro_batch_size,
                                              dataclasses.replace(layout, recompute="selective"), dtype_bytes,
                                              flash_attention)
        parts = {**state, "activations": act, "logits": 0.0}
        if pp_rank == layout.pp - 1:
            vocab_cols = math.ceil(s["vocab"] / layout.tp)
            parts["logits"] = seq_length / layout.cp * layout.micro_batch_size * vocab_cols * (dtype_bytes + 4)
        if teacher_hf is not None:
            parts["teacher"] = sum(n for _, n in rank_parameters(teacher_hf, layout.tp, layout.pp, pp_rank)) \
                * dtype_bytes
            if pp_rank == layout.pp - 1:
                # without PP one micro batch's teacher logits at a time; with PP the whole step's (recipes.kd),
                # in the model dtype plus the loss's fp32 copy
                held = 1 if layout.pp == 1 else grad_accumulation
                parts["teacher"] += held * layout.micro_batch_size * seq_length / layout.cp \
                    * math.ceil(int(teacher_hf["vocab_size"]) / layout.tp) * (dtype_bytes + 4)
        if reference_model:
            parts["reference"] = state["params"]
        if best is None or sum(parts.values()) > sum(best.values()):
            best = parts
    assert best is not None
    note = ""
    if engine is not None:
        # vLLM reserves its share of the GPU up front and fills what its weights leave with KV cache; it needs
        # room for at least one whole row and schedules as many concurrent rows as the rest holds
        reserved = engine["gpu_memory_utilization"] * H100_GIB * GIB
        weights = engine_bytes(hf, engine["tp"], 0, dtype_bytes)
        per_row = engine_bytes(hf, engine["tp"], seq_length, dtype_bytes) - weights
        rows = int((reserved - weights) // per_row) if reserved > weights else 0
        best["engine"] = max(reserved, weights + per_row)
        note = (f"rollout engine: {weights / GIB:.1f} GiB weights per engine GPU, KV cache for {rows} concurrent "
                f"rows of {seq_length} tokens" if rows else
                f"rollout engine: weights + one row's KV cache ({(weights + per_row) / GIB:.1f} GiB) exceed its "
                f"{reserved / GIB:.1f} GiB share")
        if engine.get("sleep"):
            # asleep (weights offloaded, KV cache freed) while the trainer trains: the peak is the larger of
            # training and generation, and the trainer's weights, gradients and optimizer state stay put
            training = sum(v for k, v in best.items() if k != "engine")
            generation = sum(best[k] for k in ("params", "grads", "optimizer")) + best.get("reference", 0) \
                + best["engine"]
            best = {**best, "activations": 0.0, "logits": 0.0} if generation > training else {**best, "engine": 0.0}
            note += "; it sleeps while the trainer trains (peak = max(training, generation))"
    return Plan(layout, seq_length, best, grad_accumulation, note)


def engine_bytes(hf: dict, engine_tp: int, kv_tokens: int, dtype_bytes: int = 2) -> float:
    """The rollout engine's weights and the KV cache for `kv_tokens` tokens, per engine TP rank."""
    s = _shape(hf)
    weights = sum(n for _, n in rank_parameters(hf, 1, 1, 0)) * dtype_bytes / engine_tp
    kv = kv_tokens * 2 * s["layers"] * s["nkv"] * s["hd"] * dtype_bytes / engine_tp
    return weights + kv


# ------------------------------------------------------------------------------ search


def _divisors_up_to(n: int, limit: int) -> list[int]:
    return [d for d in (1, 2, 4, 8, 16) if d <= limit and n % d == 0]


def relative_step_time(layout: Layout, grad_accumulation: int, seq_length: int) -> float:
    """A ranking heuristic, not a prediction: the pipeline bubble ((PP-1) / micro batches), recompute's extra
    forward (full: one more forward of three passes; selective: a few per cent), TP/CP communication that grows
    with the group size, and larger micro batches helping only while rows are short (< 8k tokens)."""
    bubble = (layout.pp - 1) / max(grad_accumulation, 1)
    recompute = {"none": 1.0, "selective": 1.03, "full": 1.33}[layout.recompute]
    comm = 1 + 0.04 * (layout.tp - 1) + 0.08 * (layout.cp - 1)
    batching = min(layout.micro_batch_size, max(1, 8192 // seq_length)) ** 0.1
    return (1 + bubble) * recompute * comm / batching


def search(hf: dict, seq_length: int, nodes: int, gpus_per_node: int = 8, global_batch: int = 128,
           limit_gib: float = H100_GIB, precision: str = "bf16", context_parallel: bool = True, **plan_kwargs
           ) -> list[Plan]:
    """Every layout of `nodes` x `gpus_per_node` GPUs that splits the model and the global batch and fits
    `limit_gib` (less the headroom `USABLE_FRACTION` leaves), best (by `relative_step_time`) first. TP stays inside a node; SP is on whenever TP > 1; the
    distributed optimizer whenever DP > 1; CP (Transformer Engine) only if `context_parallel`."""
    s = _shape(hf)
    world = nodes * gpus_per_node
    found = []
    for tp in _divisors_up_to(s["nkv"], gpus_per_node):
        if s["nh"] % tp:
            continue
        for pp in _divisors_up_to(s["layers"], 16):
            for cp in (1, 2, 4) if context_parallel else (1,):
                if world % (tp * pp * cp):
                    continue
                dp = world // (tp * pp * cp)
                for mbs in (1, 2, 4):
                    if global_batch % (mbs * dp):
                        continue
                    grad_acc = global_batch // (mbs * dp)
                    for recompute in RECOMPUTE_MODES:
                        layout = Layout(tp, pp, cp, dp, dp > 1, tp > 1, recompute, mbs)
                        p = plan(hf, layout, seq_length, grad_acc, precision, **plan_kwargs)
                        if p.fits(limit_gib):
                            found.append(p)
    found.sort(key=lambda p: (relative_step_time(p.layout, p.grad_accumulation, seq_length), p.total))
    return found


# ------------------------------------------------------------------------------ a stage config's plan


def _config_inputs(cfg) -> tuple[dict, int, int, str, dict, str]:
    """What the planner needs from a training stage config (SFTConfig, KDConfig or GRPOConfig): the model's HF
    config, the row length, the global batch in rows, the precision, plan() keyword arguments and a note."""
    from recipes.config import resolve_path
    from recipes.megatron.providers import load_hf_config
    from recipes.trainer import architecture

    hf = load_hf_config(architecture(cfg.model))
    precision = cfg.training.precision if cfg.training.precision != "auto" else "bf16"
    if hasattr(cfg, "grpo"):  # GRPO: a row is a prompt and its response
        g, r = cfg.grpo, cfg.rollout
        seq = min(GRPO_PROMPT_TOKENS + r.max_tokens, int(hf.get("max_position_embeddings", 4096)))
        engine = None
        if r.backend == "vllm":
            engine = {"tp": r.tensor_parallel_size, "gpu_memory_utilization": r.gpu_memory_utilization,
                      "sleep": r.colocated_sleep}
        teacher = None
        if cfg.distill.teacher:  # on-policy distillation / KDRL: a frozen teacher in the student's layout
            teacher = load_hf_config(resolve_path(cfg.distill.teacher_hf_config)) if cfg.distill.teacher_hf_config \
                else hf
        return (hf, seq, g.prompts_per_step * g.group_size // g.minibatches, precision,
                {"engine": engine, "reference_model": cfg.loss.kl_coef > 0, "teacher_hf": teacher},
                f"rows of {GRPO_PROMPT_TOKENS} prompt + {r.max_tokens} response tokens")
    from recipes.trainer import resolve_batch

    global_batch, _ = resolve_batch(cfg)
    teacher = load_hf_config(resolve_path(cfg.teacher.hf_config)) if hasattr(cfg, "teacher") else None
    kwargs = {"teacher_hf": teacher}
    if getattr(cfg, "peft", None) is not None and cfg.peft.lora.enabled:
        kwargs["lora_r"] = cfg.peft.lora.r
    return hf, cfg.data.seq_length, global_batch, precision, kwargs, ""


def _config_plan(cfg) -> Plan:
    """The plan of a training stage config (SFTConfig, KDConfig or GRPOConfig) at its own layout."""
    hf, seq, global_batch, precision, kwargs, note = _config_inputs(cfg)
    p = cfg.parallel
    mbs = cfg.grpo.micro_batch_size if hasattr(cfg, "grpo") else cfg.training.micro_batch_size
    layout = Layout(p.tp, p.pp, p.cp, p.dp, p.distributed_optimizer, p.sequence_parallel, p.recompute, mbs)
    pl = plan(hf, layout, seq, max(1, global_batch // (mbs * p.dp)), precision, **kwargs)
    pl.note = "; ".join(x for x in (pl.note, note) if x)
    return pl


def search_config(cfg, gpus_per_node: int = 8, context_parallel: bool = True,
                  limit_gib: float = H100_GIB) -> list[Plan]:
    """`search` for a stage config's model, row length, global batch and `parallel.nodes`."""
    hf, seq, global_batch, precision, kwargs, _ = _config_inputs(cfg)
    return search(hf, seq, cfg.parallel.nodes, gpus_per_node, global_batch, limit_gib, precision,
                  context_parallel, **kwargs)


def plans_table(plans: list[Plan], limit_gib: float = H100_GIB) -> str:
    """A text table of plans (GiB by part per GPU), one row each, the parts of the first plan as columns."""
    names = list(plans[0].parts)
    head = "| layout | seq | " + " | ".join(names) + f" | total GiB | fits {limit_gib * USABLE_FRACTION:.0f} of " \
        f"{limit_gib:.0f} GiB |"
    lines = [head, "|" + "---|" * (len(names) + 4)]
    for pl in plans:
        parts = pl.gib()
        lines.append(f"| {pl.layout.describe()} | {pl.seq_length} | " + " | ".join(f"{parts.get(n, 0.0):.1f}"
                     for n in names) + f" | {pl.total_gib:.1f} | {'yes' if pl.fits(limit_gib) else 'NO'} |")
    return "\n".join(lines)


def plan_table(cfg, limit_gib: float = H100_GIB) -> str:
    """A text table of the config's per-GPU memory plan (GiB by part), for headers of launch scripts and logs."""
    pl = _config_plan(cfg)
    return plans_table([pl], limit_gib) + (f"\n{pl.note}" if pl.note else "")


def check_fits(cfg, limit_gib: float = H100_GIB) -> Plan:
    """The config's plan; a ConfigError naming the layout and the largest parts when it does not fit."""
    from recipes.config import ConfigError

    pl = _config_plan(cfg)
    if not pl.fits(limit_gib):
        parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(pl.gib().items(), key=lambda kv: -kv[1]))
        raise ConfigError(f"parallel: {pl.layout.describe()} needs {pl.total_gib:.1f} GiB per GPU at seq "
                          f"{pl.seq_length} (> {USABLE_FRACTION:.0%} of {limit_gib:.0f} GiB): {parts}")
    return pl
