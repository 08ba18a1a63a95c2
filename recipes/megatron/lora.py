"""LoRA adapters on megatron-core's tensor-parallel linear layers.

Offers:
- `LoraConfig` (`peft.lora.*` of the SFT and GRPO configs): enabled, r, alpha, dropout, target_modules.
- `apply_lora(chunks, cfg, seed)`: freezes every parameter of the bare GPTModel chunks and turns each targeted
  linear layer (`linear_qkv`, `linear_proj`, `linear_fc1`, `linear_fc2`) into its LoRA variant, in place: the
  layer keeps its name and weights and gains `lora_A` [r, in] and `lora_B` [out, r] (B zero, so the adapted model
  computes exactly what the base does). Call it on the bare model, before megatron's DDP wraps it: DDP and the
  optimizer then hold grad buffers and Adam state for the adapters only.
- `merged_weight()` on an adapted layer: W + (alpha / r) B A, this rank's shard; the HF mapping exports and refits
  that, so a LoRA model converts and refits as its merged weights without any weight being changed in place.
- `base_fingerprint(chunks, hf)`: sha256 of the base model's full HF weights (layout-independent), recorded with
  every adapter checkpoint and checked when one is loaded.
- `peft_state_dict(chunks, hf)` / `write_peft_adapter(...)`: the adapters under PEFT's names (q/k/v from the fused
  qkv, gate/up from the fused fc1: B's rows split as the weight's are, A shared).

Tensor parallelism. A column-parallel layer (qkv, fc1) holds W's output rows [out/TP, in]: A [r, in] is
replicated and B [out/TP, r] is split like W; the r-wide activation x A^T goes through megatron's
copy-to-TP-region so that A's gradient (and the input's) is summed over the ranks' B shards in backward. A
row-parallel layer (proj, fc2) holds W's input columns [out, in/TP]: A [r, in/TP] is split like W and B [out, r]
is replicated; the partial products x_i A_i^T are summed over TP (an all-reduce of r values per token, instead of
adding B's output before the layer's own all-reduce of `out` values). Adapters' initial values do not depend on
the layout (A is drawn whole from a generator seeded per layer, then sliced). Sequence parallelism is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import torch

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclasses.dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / r (PEFT's convention)
    dropout: float = 0.0  # on the adapter's input
    target_modules: list[str] = dataclasses.field(default_factory=lambda: list(TARGETS))


@dataclasses.dataclass
class PeftConfig:
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)


def check_config(cfg: LoraConfig) -> None:
    from recipes.config import ConfigError

    if not cfg.enabled:
        return
    if cfg.r < 1:
        raise ConfigError(f"peft.lora.r must be >= 1, got {cfg.r}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"peft.lora.dropout must be in [0, 1), got {cfg.dropout}")
    unknown = sorted(set(cfg.target_modules) - set(TARGETS))
    if unknown or not cfg.target_modules:
        raise ConfigError(f"peft.lora.target_modules: {unknown or '[]'} match no adaptable layer "
                          f"(choose among {list(TARGETS)})")


def scale(cfg: LoraConfig) -> float:
    return cfg.alpha / cfg.r


# ------------------------------------------------------------------------------------------------- the layer


def _column(layer) -> bool:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if isinstance(layer, ColumnParallelLinear):
        return True
    if isinstance(layer, RowParallelLinear):
        return False
    mode = getattr(layer, "parallel_mode", None)  # Transformer Engine's linears
    if mode in ("column", "row"):
        return mode == "column"
    raise TypeError(f"{type(layer).__name__} is neither a column- nor a row-parallel linear layer")


class LoraLayer:
    """Mixed into the class of an adapted layer (`apply_lora` swaps the instance's class for a subclass of its own
    class with this mixin first), so the layer keeps its parameters, names and checkpoint keys."""

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        return output + self.lora_delta(input_).to(output.dtype), bias

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import (copy_to_tensor_model_parallel_region,
                                                   reduce_from_tensor_model_parallel_region)

        if self.lora_dropout > 0 and self.training:
            if self.lora_column:  # the input is the same on every TP rank: so must its mask be
                x = torch.nn.functional.dropout(x, self.lora_dropout)
            else:  # each rank holds its own slice of the input
                from megatron.core.tensor_parallel import get_cuda_rng_tracker

                with get_cuda_rng_tracker().fork():
                    x = torch.nn.functional.dropout(x, self.lora_dropout)
        h = torch.matmul(x, self.lora_A.t())
        if self.lora_column:
            h = copy_to_tensor_model_parallel_region(h)  # backward: sum of the B shards' gradients
        else:
            h = reduce_from_tensor_model_parallel_region(h)  # forward: sum of the input slices' products
        return torch.matmul(h, self.lora_B.t()) * self.lora_scale

    def merged_weight(self) -> torch.Tensor:
        """This rank's shard of W + scale * B A (W itself while `lora_merge_off` is set)."""
        w = self.weight.detach()
        if getattr(self, "lora_merge_off", False):
            return w
        delta = (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.lora_scale
        return (w.float() + delta).to(w.dtype)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        adapters = {k: v for k, v in self.state_dict(prefix="", keep_vars=True).items() if k.startswith("lora_")}
        split = {"lora_B": 0} if self.lora_column else {"lora_A": 1}
        sd.update(make_sharded_tensors_for_checkpoint(adapters, prefix, split, sharded_offsets))
        if self.lora_swiglu:  # B's rows are [gate_r; up_r] per TP rank, like fc1's weight: saved as megatron saves it
            from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

            sd[f"{prefix}lora_B"] = apply_swiglu_sharded_factory(
                sd[f"{prefix}lora_B"], sharded_offsets, (metadata or {}).get("singleton_local_shards", False))
        return sd


_CLASSES: dict[type, type] = {}


def _lora_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Lora{cls.__name__}", (LoraLayer, cls), {})
    return _CLASSES[cls]


def _adapt(layer, name: str, cfg: LoraConfig, seed: int) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    if hasattr(layer, "layer_norm_weight"):
        raise ValueError(f"{name}: LoRA on Transformer Engine's fused LayerNorm-linear is not supported (the adapter "
                         "would see the input before the norm)")
    column = _column(layer)
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    out_local, in_local = layer.weight.shape
    out_full, in_full = (out_local * tp, in_local) if column else (out_local, in_local * tp)
    if cfg.r > min(out_full, in_full):
        raise ValueError(f"peft.lora.r={cfg.r} is larger than the layer {name} ({out_full} x {in_full}): a rank "
                         f"above {min(out_full, in_full)} adds nothing; lower peft.lora.r")
    w = layer.weight
    # A is drawn whole from a generator of its own (the same at every TP/PP layout), then sliced
    gen = torch.Generator().manual_seed(seed + int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little"))
    bound = 1.0 / math.sqrt(in_full)  # kaiming-uniform with a = sqrt(5), as PEFT and nn.Linear
    a_full = (torch.rand(cfg.r, in_full, generator=gen) * 2 - 1) * bound
    a = a_full if column else a_full.chunk(tp, dim=1)[rank]
    b = torch.zeros(out_local if column else out_full, cfg.r)
    layer.__class__ = _lora_class(type(layer))
    layer.lora_A = torch.nn.Parameter(a.to(device=w.device, dtype=w.dtype).contiguous())
    layer.lora_B = torch.nn.Parameter(b.to(device=w.device, dtype=w.dtype))
    # megatron counts a TP-split parameter on every rank and a replicated one on TP rank 0 only (grad norm)
    if column:
        set_tensor_model_parallel_attributes(layer.lora_B, True, 0, 1)
    else:
        set_tensor_model_parallel_attributes(layer.lora_A, True, 1, 1)
    layer.lora_column, layer.lora_scale, layer.lora_dropout = column, scale(cfg), cfg.dropout
    layer.lora_swiglu = name.endswith("linear_fc1") and layer.config.gated_linear_unit


def adapted_layers(model) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def apply_lora(chunks: list, cfg: LoraConfig, seed: int = 0) -> list[str]:
    """Freeze the bare models `chunks` and adapt their targeted layers in place. Returns the adapted names (global
    layer numbers). A target that matches no layer, or a rank larger than a layer, is a ValueError."""
    from recipes.megatron import providers

    check_config(cfg)
    if any(getattr(m, "module", None) is not None for m in chunks):
        raise ValueError("apply_lora: give the bare models (before DDP wraps them)")
    names, found = [], set()
    for model in providers.unwrap(chunks):
        if model.config.sequence_parallel:
            raise ValueError("peft.lora with parallel.sequence_parallel is not supported: set "
                             "parallel.sequence_parallel=false")
        for p in model.parameters():
            p.requires_grad_(False)
        for name, module in list(model.named_modules()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf in cfg.target_modules and "decoder.layers." in name:
                global_name = _global_name(model, name)
                _adapt(module, global_name, cfg, seed)
                names.append(global_name)
                found.add(leaf)
        model.adapters_only_checkpoint = True
    missing = sorted(set(cfg.target_modules) - found)
    if missing:
        raise ValueError(f"peft.lora.target_modules: {missing} match no layer of this model (its linear layers: "
                         f"{list(TARGETS)})")
    return names


def _global_name(model, name: str) -> str:
    """`decoder.layers.<local>.rest` with the global layer number (PP stages number their layers from 0)."""
    parts = name.split(".")
    local = int(parts[2])
    parts[2] = str(model.decoder.layers[local].layer_number - 1)
    return ".".join(parts)


def trainable_parameters(chunks) -> int:
    return sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------- the base


def base_fingerprint(chunks: list, hf: dict) -> str:
    """sha256 over the base model's full HF tensors (names, shapes, bytes) with the adapters left out:
    the same at any TP/PP layout. A collective over the model-parallel group (every rank gets the digest)."""
    from recipes.megatron import hf_mapping, providers

    layers = [m for model in providers.unwrap(chunks) for _, m in adapted_layers(model)]
    for m in layers:
        m.lora_merge_off = True
    try:
        # in the HF checkpoint's dtype: a bf16 base trained in fp32 (or the reverse) is the same base
        dtype = getattr(torch, str(hf.get("torch_dtype") or hf.get("dtype") or "float32").replace("torch.", ""))
        digest = hashlib.sha256()
        for name, t in hf_mapping.iter_hf_weights(chunks, hf):
            digest.update(f"{name}:{tuple(t.shape)}".encode())
            digest.update(t.to(dtype).contiguous().view(torch.uint8).numpy().tobytes())
    finally:
        for m in layers:
            m.lora_merge_off = False
    return digest.hexdigest()


def adapter_description(cfg: LoraConfig, base: dict, sha256: str) -> dict:
    return {"lora": dataclasses.asdict(cfg), "base": base, "base_sha256": sha256}


# ------------------------------------------------------------------------------------------------- PEFT format

# megatron layer-local module -> (kind for B's rows as in hf_mapping, HF module names)
_PEFT_MODULES = {
    "self_attention.linear_qkv": ("qkv", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
    "self_attention.linear_proj": ("row", ["self_attn.o_proj"]),
    "mlp.linear_fc1": ("fc1", ["mlp.gate_proj", "mlp.up_proj"]),
    "mlp.linear_fc2": ("row", ["mlp.down_proj"]),
}
PEFT_TARGETS = {"linear_qkv": ["q_proj", "k_proj", "v_proj"], "linear_proj": ["o_proj"],
                "linear_fc1": ["gate_proj", "up_proj"], "linear_fc2": ["down_proj"]}


def peft_state_dict(chunks: list, hf: dict) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's key names (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`),
    full tensors on every rank. A collective over TP (all-gather of the split factor); needs PP = 1."""
    from megatron.core import parallel_state as ps

    from recipes.megatron import hf_mapping, providers

    if ps.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("peft_state_dict: export the adapters at pp=1 (a checkpoint loads at any layout)")
    out = {}
    for model in providers.unwrap(chunks):
        for name, layer in adapted_layers(model):
            parts = name.split(".")
            layer_number = model.decoder.layers[int(parts[2])].layer_number - 1
            kind, hf_names = _PEFT_MODULES[".".join(parts[3:])]
            a, b = layer.lora_A.detach(), layer.lora_B.detach()
            if layer.lora_column:
                bs = hf_mapping._from_shards(kind, hf_mapping._gather_tp(b), hf)
                as_ = [a] * len(bs)
            else:
                as_, bs = [torch.cat(hf_mapping._gather_tp(a), dim=1)], [b]
            for hf_name, a_i, b_i in zip(hf_names, as_, bs):
                key = f"base_model.model.model.layers.{layer_number}.{hf_name}"
                out[f"{key}.lora_A.weight"] = a_i.cpu().clone()
                out[f"{key}.lora_B.weight"] = b_i.cpu().contiguous().clone()
    return out


def write_peft_adapter(out, state: dict[str, torch.Tensor], cfg: LoraConfig, base_model: str | None,
                       dtype: torch.dtype = torch.float32) -> Path:
    """`adapter_config.json` + `adapter_model.safetensors` that `peft.PeftModel.from_pretrained` (and vLLM's LoRA)
    load onto the HF export of the base model."""
    from safetensors.torch import save_file

    from recipes.megatron.checkpointing import fsync_tree, recover_dir, replace_dir

    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir()
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(tmp / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
              "target_modules": sorted(t for m in cfg.target_modules for t in PEFT_TARGETS[m])}
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    fsync_tree(tmp)
    replace_dir(tmp, out)
    return out
