"""One training step on megatron-core: forward/backward over micro-batches (1F1B across PP), optimizer, log-probs.

Offers:
- `forward_backward(model_chunks, micro_batches, seq_length, forward_only=False, loss_fn=None) -> dict`
- `build_optimizer(model_chunks, lr, ...)` (megatron's `get_megatron_optimizer`, AdamW) and
  `optimizer_step(model_chunks, optimizer, micro_batches, seq_length, scheduler=None, loss_fn=None) -> dict`
  (zero grads, forward_backward, clip + step); with `distributed=True` megatron's DistributedOptimizer (each DP
  rank keeps Adam state for its shard of the grad buffer; the model must be built with `distributed_optimizer=True`).
- `held_bytes(model_chunks, optimizer) -> {"params", "grads", "optimizer"}`: the bytes of training state this rank
  actually holds (distinct storages; see its docstring for what each figure counts).
- `logprobs_of(model_chunks, tokens, ...) -> [B, S-1]` token log-probs of `tokens[:, 1:]` (GRPO).
- TP helpers for custom losses: `gather_logits`, `vocab_parallel_log_probs`, `vocab_parallel_log_softmax`,
  `tp_sum`; packing helpers `packed_attention_mask(segment_ids)`, `cu_seqlens_from_segments`.
- `check_sequence_split(model_chunks, lengths, seq_length)`: with sequence parallelism every S must be a multiple
  of TP (a ValueError naming seq_length and tp otherwise); `forward_backward` and `logprobs_of` call it.

Batch format (one dict per micro-batch, with pipeline parallelism all micro-batches of one step share
[B, S]; without it each may have its own):
  tokens [B,S] long, labels [B,S] long (the next token: labels[:, t] = tokens[:, t+1]), loss_mask [B,S] float,
  position_ids [B,S] long, attention_mask None (plain causal) or bool [B,1,S,S] with True = masked out
  (megatron's convention; `packed_attention_mask` builds the block-diagonal causal mask of packed sequences).
  Optional `cu_seqlens` int32 [n+1] (one packed row, B = 1): with Transformer Engine the row runs as THD
  (`PackedSeqParams(qkv_format="thd")`, RoPE restarts at each sequence); on the local path it becomes the
  block-diagonal mask. RoPE is relative, so a packed document attends exactly as it would alone; only
  float rounding differs between packed and unpacked runs.

Loss normalisation (identical for packed and unpacked data): the step loss is
  sum over every micro-batch and DP rank of sum_t(CE_t * loss_mask_t)  /  sum over the same of sum_t(loss_mask_t)
i.e. a token mean over the global batch, not a mean of per-micro-batch means. It is done with megatron's
`calculate_per_token_loss`: each micro-batch backpropagates its loss SUM, and `finalize_model_grads` divides the
gradients by the global loss-token count after the DP all-reduce.

Custom `loss_fn(logits, batch) -> (loss_sum, n_tokens)`: `logits` are [B,S,V/TP] vocab-parallel (the full vocab
when TP = 1), float as the model computed them; `loss_sum` is a scalar to backpropagate (a sum, normalised as
above), `n_tokens` the tokens it covers. It runs on the last pipeline stage only.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch

LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor | int]]

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask", "cu_seqlens")


# --------------------------------------------------------------------------------------------------------------
# TP-aware logits helpers
# --------------------------------------------------------------------------------------------------------------


def gather_logits(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocab logits [.., V] from vocab-parallel logits [.., V/TP] (differentiable; identity at TP=1)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    if ps.get_tensor_model_parallel_world_size() == 1:
        return logits
    return gather_from_tensor_model_parallel_region(logits)


def tp_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a per-shard partial result over TP ranks (forward all-reduce, backward identity)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    if ps.get_tensor_model_parallel_world_size() == 1:
        return x
    return reduce_from_tensor_model_parallel_region(x)


def vocab_parallel_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels) [B,S] from vocab-parallel logits [B,S,V/TP] without gathering the vocab (differentiable)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # megatron's kernel subtracts the max in place: give it its own copy
    return -vocab_parallel_cross_entropy(logits.float().clone(), labels)


def vocab_parallel_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocab log_softmax on this rank's vocab shard [.., V/TP] (differentiable), for losses that sum
    per-shard terms (then `tp_sum` the per-shard sums, e.g. a KL).

    The normaliser is all-reduced with an all-reduce in backward too: every shard's term depends on
    it, so its gradient is the sum over ranks (an identity backward under-counts it under TP > 1).
    """
    from megatron.core import parallel_state as ps
    from torch.distributed.nn.functional import all_reduce

    logits = logits.float()
    if ps.get_tensor_model_parallel_world_size() == 1:
        return torch.log_softmax(logits, dim=-1)
    group = ps.get_tensor_model_parallel_group()
    shift = logits.detach().max(dim=-1, keepdim=True).values
    torch.distributed.all_reduce(shift, op=torch.distributed.ReduceOp.MAX, group=group)
    shifted = logits - shift
    sum_exp = all_reduce(shifted.exp().sum(dim=-1, keepdim=True), group=group)
    return shifted - sum_exp.log()


# --------------------------------------------------------------------------------------------------------------
# Packing helpers
# --------------------------------------------------------------------------------------------------------------


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask [B,1,S,S] (True = masked) from segment ids [B,S] (same id = same sequence)."""
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return ~(same & causal)[:, None]


def cu_seqlens_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative sequence lengths int32 [n+1] of one packed row [S] (or [1,S]) of contiguous segments."""
    seg = segment_ids.reshape(-1)
    change = torch.nonzero(seg[1:] != seg[:-1]).reshape(-1) + 1
    zero = torch.zeros(1, dtype=torch.long, device=seg.device)
    end = torch.tensor([seg.numel()], device=seg.device)
    return torch.cat([zero, change, end]).to(torch.int32)


def _segments_from_cu_seqlens(cu: torch.Tensor, s: int) -> torch.Tensor:
    ids = torch.zeros(s, dtype=torch.long, device=cu.device)
    for i in range(len(cu) - 1):
        ids[int(cu[i]):int(cu[i + 1])] = i
    return ids[None]


# --------------------------------------------------------------------------------------------------------------
# Forward / backward
# --------------------------------------------------------------------------------------------------------------


def to_device(batch: dict) -> dict:
    """Move a batch's tensors to this rank's device."""
    from recipes.megatron import runtime

    dev = runtime.device()
    return {k: (v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def model_inputs(batch: dict, model) -> dict:
    """GPTModel kwargs {attention_mask, packed_seq_params} for a batch: the mask on the local path,
    PackedSeqParams (THD) from `cu_seqlens` with Transformer Engine. `model` is the bare GPTModel."""
    mask = batch.get("attention_mask")
    cu = batch.get("cu_seqlens")
    kwargs = {"packed_seq_params": None}
    if cu is not None:
        config = model.config
        if config.transformer_impl == "transformer_engine":
            from megatron.core.packed_seq_params import PackedSeqParams

            cu = cu.to(torch.int32)
            max_len = int((cu[1:] - cu[:-1]).max())
            kwargs["packed_seq_params"] = PackedSeqParams(
                qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len)
            mask = None
        elif mask is None:
            mask = packed_attention_mask(_segments_from_cu_seqlens(cu, batch["tokens"].shape[1]))
    kwargs["attention_mask"] = mask
    return kwargs


def _default_loss(per_token_ce: torch.Tensor, batch: dict):
    mask = batch["loss_mask"].float()
    return (per_token_ce.float() * mask).sum(), mask.sum()


def _loss_func(batch: dict, loss_fn: LossFn | None, output_tensor: torch.Tensor):
    if loss_fn is None:
        loss_sum, n_tokens = _default_loss(output_tensor, batch)
    else:
        loss_sum, n_tokens = loss_fn(output_tensor, batch)
    n_tokens = torch.as_tensor(n_tokens, device=loss_sum.device).detach()
    # report (loss_sum, n_tokens); megatron accumulates n_tokens into the gradient scaling
    reduced = torch.stack([loss_sum.detach().float(), n_tokens.float()])
    return loss_sum, n_tokens.to(torch.int), {"loss_sum_and_tokens": reduced}


def _forward_step(loss_fn, data_iterator, model):
    batch = to_device(next(data_iterator))
    extra = model_inputs(batch, bare_model(model))
    labels = batch["labels"] if loss_fn is None else None  # megatron computes per-token CE from labels
    output = model(batch["tokens"], batch["position_ids"], extra["attention_mask"], labels=labels,
                   packed_seq_params=extra["packed_seq_params"])
    return output, partial(_loss_func, batch, loss_fn)


def bare_model(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def _configure(model_chunks) -> object:
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(model_chunks[0])
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads
    if hasattr(model_chunks[0], "no_sync"):
        config.no_sync_func = model_chunks[0].no_sync if len(model_chunks) == 1 else [m.no_sync for m in model_chunks]
    return config


def check_sequence_split(model_chunks: list, lengths, seq_length: int) -> None:
    """With sequence parallelism megatron scatters the embedding output along S over the TP ranks (and gathers it
    back before attention and the output layer), so every micro-batch's S must be a multiple of TP."""
    from megatron.core.utils import get_model_config

    config = get_model_config(model_chunks[0])
    tp = config.tensor_model_parallel_size
    if not config.sequence_parallel or tp == 1:
        return
    bad = sorted({int(s) for s in lengths if int(s) % tp})
    if bad:
        raise ValueError(f"sequence_parallel with tp={tp} splits each sequence into {tp} equal slices, but micro-batch "
                         f"sequence length(s) {bad} are not divisible by tp={tp} (seq_length={seq_length}): make "
                         f"data.seq_length a multiple of parallel.tp, or set parallel.sequence_parallel=false")


def _reduce_report(forward_data_store: list) -> tuple[float, float]:
    """Sum (loss_sum, n_tokens) over micro-batches and DP ranks; broadcast from the last PP stage to all ranks."""
    from megatron.core import parallel_state as ps

    from recipes.megatron import runtime

    total = torch.zeros(2, dtype=torch.float64, device=runtime.device())
    for item in forward_data_store:
        total += item["loss_sum_and_tokens"].to(total)
    if ps.is_pipeline_last_stage():
        torch.distributed.all_reduce(total, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(total, src=ps.get_pipeline_model_parallel_last_rank(),
                                    group=ps.get_pipeline_model_parallel_group())
    return float(total[0]), float(total[1])


def forward_backward(model_chunks: list, micro_batches: list[dict], seq_length: int, forward_only: bool = False,
                     loss_fn: LossFn | None = None) -> dict:
    """Run every micro-batch forward (and backward unless `forward_only`) with megatron's schedule.

    Gradients land in the DDP grad buffers, already divided by the global loss-token count (see module doc).
    Returns {"loss": sum(CE*mask)/sum(mask) over the global batch, "loss_sum", "num_tokens"} on every rank.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        raise ValueError("forward_backward: no micro-batches")
    from megatron.core import parallel_state as ps

    shape = tuple(micro_batches[0]["tokens"].shape)
    if ps.get_pipeline_model_parallel_world_size() > 1:  # stages exchange activations of one [S, B, H] shape
        for i, mb in enumerate(micro_batches):
            if tuple(mb["tokens"].shape) != shape:
                raise ValueError(f"micro-batch {i}: tokens shape {tuple(mb['tokens'].shape)} != {shape} "
                                 "(with pipeline parallelism all micro-batches of a step share [B, S])")
        if shape[1] != seq_length:
            raise ValueError(f"micro-batch tokens have S={shape[1]} but seq_length={seq_length}")
    check_sequence_split(model_chunks, [mb["tokens"].shape[1] for mb in micro_batches], seq_length)
    _configure(model_chunks)
    store = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, loss_fn),
        data_iterator=iter(micro_batches),
        model=model_chunks,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=shape[0],
        forward_only=forward_only,
    )
    loss_sum, n_tokens = _reduce_report(store)
    return {"loss": loss_sum / max(n_tokens, 1.0), "loss_sum": loss_sum, "num_tokens": n_tokens}


# --------------------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------------------


def build_optimizer(model_chunks: list, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95), eps: float = 1e-8,
                    clip_grad: float = 1.0, min_lr: float | None = None, distributed: bool = False):
    """megatron-core's optimizer (AdamW, decoupled weight decay) over DDP-wrapped chunks; mixed precision follows
    the model's dtype (bf16 params keep fp32 main weights)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.utils import get_model_config

    mconfig = get_model_config(model_chunks[0])
    config = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=min_lr if min_lr is not None else lr, weight_decay=weight_decay,
        adam_beta1=betas[0], adam_beta2=betas[1], adam_eps=eps, clip_grad=clip_grad,
        bf16=mconfig.bf16, fp16=mconfig.fp16, params_dtype=mconfig.params_dtype,
        use_distributed_optimizer=distributed,
    )
    return get_megatron_optimizer(config, model_chunks)


def optimizer_step(model_chunks: list, optimizer, micro_batches: list[dict], seq_length: int, scheduler=None,
                   loss_fn: LossFn | None = None) -> dict:
    """Zero grads, forward_backward, clip and step. Returns the loss report plus grad_norm and lr."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    report = forward_backward(model_chunks, micro_batches, seq_length, loss_fn=loss_fn)
    ok, grad_norm, _ = optimizer.step()
    if scheduler is not None and ok:
        scheduler.step(increment=1)
    report.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"), update_ok=bool(ok),
                  lr=float(optimizer.param_groups[0]["lr"]))
    return report


def _storage_bytes(tensors) -> dict[int, int]:
    """{storage address: bytes} of the storages behind `tensors` (views of one buffer share one storage)."""
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            out[st.data_ptr()] = st.nbytes()
    return out


def held_bytes(model_chunks: list, optimizer=None) -> dict:
    """Bytes of training state this rank holds: {"params", "grads", "optimizer"}.

    Counted per distinct storage, so a tensor that is a view into a larger buffer counts that whole buffer, once:
    - params: the storages of this rank's model parameters (one per parameter; with the distributed optimizer
      megatron's contiguous param buffer of the DDP chunk, its padding included);
    - grads: the storages of the parameters' `main_grad`, i.e. megatron's DDP grad buffers (fp32 here, the
      padding that makes them divisible by DP included);
    - optimizer: the storages of the torch optimizer's per-parameter state (Adam's exp_avg and exp_avg_sq) and of
      the tensors it updates when they are copies of the model's (fp32 main params of a bf16/fp16 model), minus
      any storage already counted as params or grads (an fp32 model's params are updated in place, so they are
      not counted twice). With the distributed optimizer these exist for this rank's shard of the grad buffer
      only. The scalar `step` counters are left out. `optimizer=None` gives 0; torch's Adam creates its moments at
      the first step, so measure after one.
    """
    params = [p for chunk in model_chunks for p in chunk.parameters()]
    held_params = _storage_bytes(params)
    held_grads = _storage_bytes(getattr(p, "main_grad", None) for p in params)
    state = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer] if optimizer is not None else []):
        inner = opt.optimizer
        for group in inner.param_groups:
            state += group["params"]
        for per_param in inner.state.values():
            state += [v for k, v in per_param.items() if k != "step"]
    held_opt = {k: v for k, v in _storage_bytes(state).items() if k not in held_params and k not in held_grads}
    return {"params": sum(held_params.values()), "grads": sum(held_grads.values()),
            "optimizer": sum(held_opt.values())}


# --------------------------------------------------------------------------------------------------------------
# Log-probs (GRPO)
# --------------------------------------------------------------------------------------------------------------


def logprobs_of(model_chunks: list, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                micro_batch_size: int | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Token log-probs [B, S-1]: entry t is log p(tokens[:, t+1] | tokens[:, :t+1]). Available on every rank.

    `attention_mask` as in the batch format (None = causal). Runs forward-only through the pipeline schedule in
    micro-batches of `micro_batch_size` rows (default: all rows at once; B must divide evenly). `temperature`
    scales the logits first (the distribution a sampler at that temperature drew from).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from recipes.megatron import runtime

    b, s = tokens.shape
    mbs = micro_batch_size or b
    if b % mbs:
        raise ValueError(f"logprobs_of: batch {b} is not divisible by micro_batch_size {mbs}")
    check_sequence_split(model_chunks, [s], s)
    labels = torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1)
    position_ids = torch.arange(s, device=tokens.device).expand(b, s)
    micro = []
    for i in range(0, b, mbs):
        micro.append({
            "tokens": tokens[i:i + mbs], "labels": labels[i:i + mbs], "position_ids": position_ids[i:i + mbs],
            "attention_mask": None if attention_mask is None else attention_mask[i:i + mbs],
        })

    def loss_func(batch, output):
        lp = vocab_parallel_log_probs(output if temperature == 1.0 else output / temperature, batch["labels"])
        return lp.sum() * 0.0, torch.tensor(1, dtype=torch.int), {"logprobs": lp.detach()}

    def step(data_iterator, model):
        batch = to_device(next(data_iterator))
        extra = model_inputs(batch, bare_model(model))
        out = model(batch["tokens"], batch["position_ids"], extra["attention_mask"])
        return out, partial(loss_func, batch)

    was_training = [m.training for m in model_chunks]
    for m in model_chunks:
        m.eval()
    _configure(model_chunks)
    with torch.no_grad():
        store = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(micro), model=model_chunks, num_microbatches=len(micro),
            seq_length=s, micro_batch_size=mbs, forward_only=True)
    for m, t in zip(model_chunks, was_training):
        m.train(t)
    out = torch.empty(b, s, dtype=torch.float32, device=runtime.device())
    if ps.is_pipeline_last_stage():
        out = torch.cat([item["logprobs"].float() for item in store], dim=0)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(out, src=ps.get_pipeline_model_parallel_last_rank(),
                                    group=ps.get_pipeline_model_parallel_group())
    return out[:, :-1]


# names used before these helpers were public
_to_device, _model_inputs, _bare = to_device, model_inputs, bare_model
