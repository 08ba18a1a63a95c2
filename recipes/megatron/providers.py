"""Model providers: a Hugging Face `config.json` -> megatron-core `GPTModel` chunks for this rank.

Offers:
- `load_hf_config(path_or_dir) -> dict` (a `config.json` file, a folder holding one, or a dict).
- `family(hf) -> str`: "qwen2" (Qwen2/Qwen2.5: qkv bias), "qwen3" (qk-norm, no qkv bias), "llama" (Llama 3).
- `transformer_config_from_hf(hf, tp, pp, dtype=None, **overrides) -> TransformerConfig`: GQA, RMSNorm, SwiGLU,
  RoPE; dropout 0 by default; fp32 on CPU and bf16 on GPU unless `dtype` says otherwise.
- `build_model(hf, tp, pp, seed, ddp=True) -> list`: the model chunks of this rank (one chunk, no virtual
  pipeline), as megatron's `get_forward_backward_func` and `get_megatron_optimizer` expect. With `ddp=True`
  each chunk is wrapped in megatron's `DistributedDataParallel` (needed by the optimizer and for gradient
  all-reduce across DP and the tied embedding across PP); `unwrap(chunks)` gives the bare `GPTModel`s.
- `padded_vocab_size(hf, tp)`, `rope_inv_freq(hf)` (HF's RoPE frequencies including llama3/linear scaling).
- `memory_overrides(sequence_parallel, recompute, cp) -> dict`: the TransformerConfig fields of those layout knobs
  (megatron's own sequence parallelism, full/selective activation recompute, context parallelism), for
  `build_model(config_overrides=...)`; `layer_spec(config)`: the decoder spec `build_model` uses.

The Transformer Engine layer spec is used when `import transformer_engine` works (GPU), the local megatron-core
spec otherwise (`transformer_impl="local"`, CPU initialisation, no fused kernels; its core attention through
torch's SDPA, `sdpa_attention.py`; its norms `norms.RMSNorm`, which support sequence parallelism).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

SUPPORTED = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama"}


def load_hf_config(path_or_dir) -> dict:
    """Read an HF `config.json` (path to the file or to its folder); a dict is returned as a copy."""
    if isinstance(path_or_dir, dict):
        return dict(path_or_dir)
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no HF config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON in HF config ({err.msg})") from err


def family(hf: dict) -> str:
    model_type = hf.get("model_type", "")
    if model_type not in SUPPORTED:
        raise ValueError(f"HF config: model_type '{model_type}' is not supported (supported: {sorted(SUPPORTED)})")
    return SUPPORTED[model_type]


def have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def head_dim(hf: dict) -> int:
    return int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])


def padded_vocab_size(hf: dict, tp: int = 1) -> int:
    """The embedding rows megatron holds: HF's vocab_size rounded up to a multiple of TP (the HF configs here are
    already padded, so this is normally HF's vocab_size; extra rows are dropped on export)."""
    vocab = int(hf["vocab_size"])
    return int(math.ceil(vocab / tp) * tp)


def _rope_params(hf: dict) -> tuple[float, dict]:
    # transformers 5 writes `rope_parameters`; older configs have rope_theta + rope_scaling
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    merged = {**scaling, **params}
    merged.setdefault("rope_type", merged.get("type", "default"))
    return theta, merged


def rope_inv_freq(hf: dict) -> torch.Tensor:
    """RoPE inverse frequencies exactly as transformers computes them (default, linear and llama3 rope types)."""
    theta, scaling = _rope_params(hf)
    dim = head_dim(hf)
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
    rope_type = scaling["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"HF config: rope_type '{rope_type}' is not supported (default, linear, llama3)")


def transformer_config_from_hf(hf: dict, tp: int = 1, pp: int = 1, dtype: torch.dtype | None = None, **overrides):
    """megatron-core `TransformerConfig` for an HF decoder config. `overrides` set any TransformerConfig field."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    fam = family(hf)
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"HF config: hidden_act '{hf.get('hidden_act')}' is not supported (silu)")
    if fam == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise ValueError("HF config: llama with attention_bias/mlp_bias is not supported")
    if hf["num_hidden_layers"] % pp:
        raise ValueError(f"num_hidden_layers {hf['num_hidden_layers']} is not divisible by pipeline_parallel {pp}")
    kv_heads = int(hf.get("num_key_value_heads") or hf["num_attention_heads"])
    if hf["num_attention_heads"] % tp or kv_heads % tp:
        raise ValueError(f"attention heads {hf['num_attention_heads']} / KV heads {kv_heads} are not divisible by "
                         f"tensor_parallel {tp}")
    gpu = torch.cuda.is_available()
    if dtype is None:
        dtype = torch.bfloat16 if gpu else torch.float32
    te = have_te()
    kwargs = dict(
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=int(hf["hidden_size"]),
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=int(hf["num_attention_heads"]),
        num_query_groups=kv_heads,
        kv_channels=head_dim(hf),
        normalization="RMSNorm",
        layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        activation_func=F.silu,
        gated_linear_unit=True,
        add_bias_linear=False,
        add_qkv_bias=fam == "qwen2" or bool(hf.get("attention_bias", False)),
        qk_layernorm=fam == "qwen3",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=float(hf.get("initializer_range", 0.02)),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        use_cpu_initialization=not gpu,
        gradient_accumulation_fusion=False,
        # megatron's SwiGLU function keeps only the fc1 output for backward (recomputing the activation): eager
        # SiLU-times-gate also keeps a copy of the gate and the SiLU output, 2 x ffn_hidden_size more per token
        bias_activation_fusion=True,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        transformer_impl="transformer_engine" if te else "local",
        variable_seq_lengths=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(config):
    """The decoder spec of this rank's pipeline stage: Transformer Engine's layer spec, or megatron's local spec
    with SDPA core attention and `norms.RMSNorm` for every norm (the layers', the qk-norm and the final one), which
    unlike megatron's `WrappedTorchNorm` supports sequence parallelism."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if config.transformer_impl == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    from recipes.megatron.norms import RMSNorm
    from recipes.megatron.sdpa_attention import SDPADotProductAttention

    spec = get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization="RMSNorm")
    layer, attention = spec.submodules, spec.submodules.self_attention.submodules
    attention.core_attention = SDPADotProductAttention
    layer.input_layernorm = layer.pre_mlp_layernorm = RMSNorm
    if config.qk_layernorm:
        attention.q_layernorm = attention.k_layernorm = RMSNorm
    # a layer spec alone gets the block's final norm from megatron's module-level default (WrappedTorchNorm on
    # CPU); a block spec names it
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=RMSNorm)


def memory_overrides(sequence_parallel: bool = False, recompute: str = "none", cp: int = 1) -> dict:
    """TransformerConfig fields for the memory-saving layout knobs of `trainer.ParallelConfig`."""
    out: dict = {}
    if sequence_parallel:
        out["sequence_parallel"] = True
    if recompute == "full":  # every layer recomputed from its input in backward
        out.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":  # only core attention (its S x S intermediates) is recomputed
        out.update(recompute_granularity="selective")
    elif recompute != "none":
        raise ValueError(f"recompute must be none, selective or full, got {recompute!r}")
    if cp > 1:
        out["context_parallel_size"] = cp
    return out


def build_model(hf: dict, tp: int = 1, pp: int = 1, seed: int = 0, *, ddp: bool = True,
                dtype: torch.dtype | None = None, config_overrides: dict | None = None,
                distributed_optimizer: bool = False) -> list:
    """Build this rank's model chunks (randomly initialised from `seed`). Call `runtime.init_distributed(tp, pp)`
    first. Load weights with `hf_mapping.load_hf_into_megatron` or `checkpointing.load_checkpoint`."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from recipes.megatron import runtime

    hf = load_hf_config(hf)
    if not ps.model_parallel_is_initialized():
        raise RuntimeError("build_model: call recipes.megatron.runtime.init_distributed(tp, pp) first")
    if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) != (tp, pp):
        raise ValueError(f"build_model(tp={tp}, pp={pp}) but the process was initialised with "
                         f"tp={ps.get_tensor_model_parallel_world_size()}, "
                         f"pp={ps.get_pipeline_model_parallel_world_size()}")
    config = transformer_config_from_hf(hf, tp=tp, pp=pp, dtype=dtype, **(config_overrides or {}))
    # the same init on every DP replica; TP shards differ through megatron's own RNG streams
    torch.manual_seed(seed)
    runtime._seed_all(seed)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config),
        vocab_size=padded_vocab_size(hf, tp),
        max_sequence_length=int(hf.get("max_position_embeddings", 4096)),
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=int(_rope_params(hf)[0]),
    )
    # megatron's llama3 scaling hard-codes original_max_position_embeddings=8192: use HF's frequencies instead
    model.rotary_pos_emb.inv_freq = rope_inv_freq(hf).to(model.rotary_pos_emb.inv_freq.device)
    model.hf_config = hf
    # the local spec's RMSNorm (torch.nn.RMSNorm) keeps fp32 weights in a bf16 model, which megatron's mixed-
    # precision optimizer then files apart from the rest and its checkpoint mapping no longer lines up
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != config.params_dtype:
            param.data = param.data.to(config.params_dtype)
    if not runtime.is_cpu():
        model.cuda(torch.cuda.current_device())
    if not ddp:
        return [model]
    return [_wrap_ddp(model, config, distributed_optimizer)]


def wrap_ddp(chunks: list, distributed_optimizer: bool = False) -> list:
    """megatron's DDP around bare chunks, as `build_model(ddp=True)` returns them (after freezing some parameters
    with `build_model(ddp=False)`: DDP keeps grad buffers for trainable parameters only)."""
    return [_wrap_ddp(m, m.config, distributed_optimizer) for m in chunks]


def _wrap_ddp(model, config, distributed_optimizer: bool = False):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    # DDP fixes each bucket's gradient scaling when it is built: 1/DP unless the loss is per-token. train_step's
    # loss is a token SUM that finalize_model_grads divides by the global token count, so it must be per-token
    # here already, or every gradient at DP > 1 comes out divided by DP once more.
    config.calculate_per_token_loss = True
    # gradients are reduced in fp32; with the distributed optimizer the reduction is a reduce-scatter (each DP
    # rank keeps the reduced gradients of its shard) and the updated params are all-gathered after the step
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=distributed_optimizer)
    wrapped = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    wrapped.broadcast_params()  # DP replicas start from rank 0's weights of their model-parallel position
    return wrapped


def unwrap(model_chunks) -> list:
    """The bare GPTModel of each chunk (DDP / Float16Module wrappers removed)."""
    out = []
    for chunk in model_chunks:
        while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
            chunk = chunk.module
        out.append(chunk)
    return out
