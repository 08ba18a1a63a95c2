"""THE Hugging Face <-> megatron-core weight mapping for Qwen2/2.5, Qwen3 and Llama 3 (conversion and vLLM refit).

Offers:
- `load_hf_into_megatron(model_chunks, hf_state_dict, hf_config)`: every rank passes the FULL HF state dict and
  copies in its own TP shard of its own PP stage's layers.
- `iter_hf_weights(model_chunks, hf_config)`: yields (HF name, full tensor) for the whole model, gathered over
  TP (all_gather) and PP (broadcast from the owning stage). A collective: every rank of the model-parallel group
  must drain the iterator; every rank receives every tensor (use it to stream weights into vLLM).
- `megatron_to_hf(model_chunks, hf_config) -> dict`: `dict(iter_hf_weights(...))`, the full HF state dict on
  EVERY rank (tensors in the model's dtype, on CPU).
- `stream_hf_units(model_chunks, hf_config)`: the HF tensors of one megatron module at a time, delivered to global
  rank 0 only (refit into the engine rank 0 hosts): a tensor is gathered over its TP group on the PP stage that
  owns it and sent point-to-point to rank 0; data-parallel replicas other than the first take no part. Every rank
  of the first replica must drain it (the others get an empty iterator); only rank 0 receives tensors.
- `read_hf_weights(dir)` / `hf_weight_names(hf_config)`: safetensors (single or sharded) reader, expected names.

Layout facts the mapping encodes (megatron-core 0.16, local and Transformer Engine specs):
- `linear_qkv` rows are grouped per query group g: [q heads of g (num_heads/num_groups x head_dim), k_g, v_g];
  TP splits by whole query groups. Bias (Qwen2) follows the same layout.
- `linear_fc1` is [gate; up] per TP shard: shard r holds [gate_r; up_r].
- `linear_proj` and `linear_fc2` are row-parallel (split on the input dim); embeddings/output layer are
  vocab-parallel with rows padded to `providers.padded_vocab_size` (padding is dropped on export).
- Layer numbers are global (`layer.layer_number - 1`), so PP offsets come from megatron itself.
- Tied embeddings: the output layer of the last PP stage shares the embedding; HF writes no `lm_head.weight`.
- Transformer Engine fuses the pre-norms: `linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import torch

from recipes.megatron import providers

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# megatron layer-local name -> (kind, HF layer-local names)
_LAYER_PARAMS = {
    "input_layernorm.weight": ("replicated", ["input_layernorm.weight"]),
    "self_attention.linear_qkv.layer_norm_weight": ("replicated", ["input_layernorm.weight"]),
    "self_attention.linear_qkv.weight": ("qkv", ["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                  "self_attn.v_proj.weight"]),
    "self_attention.linear_qkv.bias": ("qkv", ["self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                                "self_attn.v_proj.bias"]),
    "self_attention.q_layernorm.weight": ("replicated", ["self_attn.q_norm.weight"]),
    "self_attention.k_layernorm.weight": ("replicated", ["self_attn.k_norm.weight"]),
    "self_attention.linear_proj.weight": ("row", ["self_attn.o_proj.weight"]),
    "pre_mlp_layernorm.weight": ("replicated", ["post_attention_layernorm.weight"]),
    "mlp.linear_fc1.layer_norm_weight": ("replicated", ["post_attention_layernorm.weight"]),
    "mlp.linear_fc1.weight": ("fc1", ["mlp.gate_proj.weight", "mlp.up_proj.weight"]),
    "mlp.linear_fc2.weight": ("row", ["mlp.down_proj.weight"]),
}


def _tp():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


def _mapping(name: str, layer_numbers: dict[int, int], hf: dict) -> tuple[str, list[str]] | None:
    """(kind, HF names) for one megatron parameter name of a bare GPTModel; None for parameters HF lacks."""
    if name == "embedding.word_embeddings.weight":
        return "vocab", ["model.embed_tokens.weight"]
    if name == "output_layer.weight":
        if hf.get("tie_word_embeddings", False):
            return None  # the shared copy of the embedding on the last PP stage
        return "vocab", ["lm_head.weight"]
    if name == "decoder.final_layernorm.weight":
        return "replicated", ["model.norm.weight"]
    if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B"):
        return None  # LoRA adapters (recipes.megatron.lora): exported merged into their layer's weight
    m = _LAYER.match(name)
    if m and m.group(2) in _LAYER_PARAMS:
        kind, hf_names = _LAYER_PARAMS[m.group(2)]
        layer = layer_numbers[int(m.group(1))]
        return kind, [f"model.layers.{layer}.{n}" for n in hf_names]
    raise KeyError(f"no HF mapping for megatron parameter '{name}'")


def _layer_numbers(model) -> dict[int, int]:
    return {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}


def _qkv_dims(hf: dict) -> tuple[int, int, int]:
    heads = int(hf["num_attention_heads"])
    groups = int(hf.get("num_key_value_heads") or heads)
    return heads // groups, groups, providers.head_dim(hf)


# ---- HF tensors -> full megatron tensor -> this rank's shard ------------------------------------------------


def _to_shard(kind: str, tensors: list[torch.Tensor], hf: dict, tp: int, rank: int, rows: int) -> torch.Tensor:
    if kind == "replicated":
        return tensors[0]
    if kind == "vocab":
        full = tensors[0]
        if full.shape[0] < rows:  # vocab padding rows for TP divisibility
            full = torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])
        return full.chunk(tp, dim=0)[rank]
    if kind == "row":
        return tensors[0].chunk(tp, dim=1)[rank]
    if kind == "fc1":
        gate, up = tensors
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    if kind == "qkv":
        q, k, v = tensors
        q_per_group, groups, hd = _qkv_dims(hf)
        rest = q.shape[1:]
        qg = q.reshape(groups, q_per_group * hd, *rest)
        kg = k.reshape(groups, hd, *rest)
        vg = v.reshape(groups, hd, *rest)
        full = torch.cat([qg, kg, vg], dim=1).reshape(groups * (q_per_group + 2) * hd, *rest)
        return full.chunk(tp, dim=0)[rank]
    raise ValueError(kind)


# ---- this rank's shards gathered over TP -> HF tensors -------------------------------------------------------


def _from_shards(kind: str, shards: list[torch.Tensor], hf: dict) -> list[torch.Tensor]:
    if kind == "replicated":
        return [shards[0]]
    if kind == "vocab":
        return [torch.cat(shards, dim=0)[: int(hf["vocab_size"])]]
    if kind == "row":
        return [torch.cat(shards, dim=1)]
    if kind == "fc1":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    if kind == "qkv":
        full = torch.cat(shards, dim=0)
        q_per_group, groups, hd = _qkv_dims(hf)
        rest = full.shape[1:]
        grouped = full.reshape(groups, (q_per_group + 2) * hd, *rest)
        q, k, v = grouped.split([q_per_group * hd, hd, hd], dim=1)
        return [q.reshape(groups * q_per_group * hd, *rest), k.reshape(groups * hd, *rest),
                v.reshape(groups * hd, *rest)]
    raise ValueError(kind)


# ---- public API -----------------------------------------------------------------------------------------------


def hf_weight_names(hf: dict) -> list[str]:
    """The HF tensor names a model with this config has (what `megatron_to_hf` returns)."""
    fam = providers.family(hf)
    names = ["model.embed_tokens.weight"]
    for i in range(int(hf["num_hidden_layers"])):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        if fam == "qwen2":
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        if fam == "qwen3":
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    names.append("model.norm.weight")
    if not hf.get("tie_word_embeddings", False):
        names.append("lm_head.weight")
    return names


def load_hf_into_megatron(model_chunks: list, hf_state_dict: dict[str, torch.Tensor], hf_config: dict) -> None:
    """Copy a full HF state dict into this rank's chunks (each rank takes its TP shard of its PP layers)."""
    hf = providers.load_hf_config(hf_config)
    tp, tp_rank = _tp()
    missing = [n for n in hf_weight_names(hf) if n not in hf_state_dict]
    if missing:
        raise KeyError(f"HF state dict lacks {len(missing)} tensors the config needs, e.g. {missing[:3]}")
    emb = hf_state_dict["model.embed_tokens.weight"]
    if emb.shape[0] != int(hf["vocab_size"]):
        raise ValueError(f"model.embed_tokens.weight has {emb.shape[0]} rows but config vocab_size is "
                         f"{hf['vocab_size']}")
    for model in providers.unwrap(model_chunks):
        layers = _layer_numbers(model)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name == "output_layer.weight" and hf.get("tie_word_embeddings", False):
                    kind, hf_names = "vocab", ["model.embed_tokens.weight"]
                elif _mapping(name, layers, hf) is None:
                    continue  # LoRA adapters: not part of the HF model
                else:
                    kind, hf_names = _mapping(name, layers, hf)
                src = _to_shard(kind, [hf_state_dict[n] for n in hf_names], hf, tp, tp_rank, param.shape[0] * tp)
                if tuple(src.shape) != tuple(param.shape):
                    raise ValueError(f"{name}: HF {hf_names} give shard shape {tuple(src.shape)}, megatron "
                                     f"expects {tuple(param.shape)}")
                param.copy_(src.to(param.dtype))


def _gather_tp(t: torch.Tensor) -> list[torch.Tensor]:
    from megatron.core import parallel_state as ps

    tp, _ = _tp()
    if tp == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(tp)]
    torch.distributed.all_gather(out, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    return out


def _exported(model, name: str, param: torch.Tensor) -> torch.Tensor:
    """A parameter's value as HF sees it: a LoRA-adapted layer's weight with its adapter merged in."""
    module, _, leaf = name.rpartition(".")
    layer = model.get_submodule(module) if leaf == "weight" else None
    return layer.merged_weight() if hasattr(layer, "merged_weight") else param.detach()


def _local_hf_tensors(model, hf: dict):
    """(HF name, full tensor) for this PP stage's parameters (TP collective)."""
    layers = _layer_numbers(model)
    for name, param in model.named_parameters():
        mapped = _mapping(name, layers, hf)
        if mapped is None:
            continue
        kind, value = mapped[0], _exported(model, name, param)
        shards = [value] if kind == "replicated" else _gather_tp(value)
        yield from zip(mapped[1], _from_shards(kind, shards, hf))


def iter_hf_weights(model_chunks: list, hf_config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the full HF weights (name, tensor on CPU), gathered over TP and PP, in model order.

    Collective over the model-parallel group: every rank must consume the whole iterator."""
    from megatron.core import parallel_state as ps

    from recipes.megatron import runtime

    hf = providers.load_hf_config(hf_config)
    models = providers.unwrap(model_chunks)
    pp = ps.get_pipeline_model_parallel_world_size()
    if pp == 1:
        for model in models:
            for name, t in _local_hf_tensors(model, hf):
                yield name, t.cpu()
        return
    group = ps.get_pipeline_model_parallel_group()
    ranks = torch.distributed.get_process_group_ranks(group)
    my_stage = ps.get_pipeline_model_parallel_rank()
    dev = runtime.device()
    for stage in range(pp):
        local = iter(()) if stage != my_stage else (t for m in models for t in _local_hf_tensors(m, hf))
        while True:
            item = next(local, None) if stage == my_stage else None
            meta = [None if item is None else (item[0], tuple(item[1].shape), item[1].dtype)]
            torch.distributed.broadcast_object_list(meta, src=ranks[stage], group=group)
            if meta[0] is None:
                break
            name, shape, dtype = meta[0]
            buf = item[1].to(dev).contiguous() if stage == my_stage else torch.empty(shape, dtype=dtype, device=dev)
            torch.distributed.broadcast(buf, src=ranks[stage], group=group)
            yield name, buf.cpu()


def _gather_tp_to_first(t: torch.Tensor) -> list[torch.Tensor] | None:
    """The TP shards of `t` on TP rank 0 (None elsewhere): a gather, not an all-gather, so only the rank that
    forwards the tensor holds the full copy."""
    from megatron.core import parallel_state as ps

    tp, tp_rank = _tp()
    if tp == 1:
        return [t]
    group = ps.get_tensor_model_parallel_group()
    out = [torch.empty_like(t) for _ in range(tp)] if tp_rank == 0 else None
    torch.distributed.gather(t.contiguous(), out, dst=torch.distributed.get_global_rank(group, 0), group=group)
    return out


def _local_units(model, hf: dict):
    """Per megatron module (weights and biases of one layer together), its HF tensors on TP rank 0 of this stage
    (None on the other TP ranks, which only take part in the gathers).

    A unit is never split across refit buckets: vLLM fuses q/k/v (weight and bias) and gate/up into one layer and
    processes a layer once all its elements arrived, so a layer must arrive within one load call."""
    _, tp_rank = _tp()
    layers = _layer_numbers(model)
    unit, prefix = [], None
    for name, param in model.named_parameters():
        mapped = _mapping(name, layers, hf)
        if mapped is None:
            continue
        module = name.rsplit(".", 1)[0]
        if prefix is not None and module != prefix:
            yield unit if tp_rank == 0 else None
            unit = []
        prefix = module
        kind, value = mapped[0], _exported(model, name, param)
        shards = [value] if kind == "replicated" else _gather_tp_to_first(value)
        if tp_rank == 0:
            # clone a replicated parameter: the engine must not hold (or see later updates of) the trainer's storage
            tensors = [shards[0].clone()] if kind == "replicated" else _from_shards(kind, shards, hf)
            unit += list(zip(mapped[1], tensors))
            del tensors  # the unit holds them; no stale reference once it is handed out
        del shards
    if prefix is not None:
        yield unit if tp_rank == 0 else None


def stream_hf_units(model_chunks: list, hf_config: dict) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield, on global rank 0, the HF tensors of one megatron module at a time (on this rank's device), in model
    order, PP stage by PP stage.

    Only the first data-parallel (and context-parallel) replica takes part. On the stage that owns a module its TP
    ranks gather each tensor to TP rank 0, which converts it to HF names and sends it to rank 0 (a name/shape/dtype
    header, then the tensors); stages never exchange tensors with each other. Rank 0 holds at most the unit it is
    handing out: a sender waits in `send` until rank 0 asks for the next unit. Every rank of the first replica must
    drain the iterator (ranks other than 0 yield nothing)."""
    from megatron.core import parallel_state as ps

    from recipes.megatron import runtime

    hf = providers.load_hf_config(hf_config)
    models = providers.unwrap(model_chunks)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and (ps.get_data_parallel_rank() != 0 or ps.get_context_parallel_rank() != 0):
        return  # a replica of the weights rank 0's replica already sends
    local = (u for m in models for u in _local_units(m, hf))
    pp = ps.get_pipeline_model_parallel_world_size() if distributed else 1
    if pp == 1:
        if not distributed or torch.distributed.get_rank() == 0:
            yield from local
        else:
            for _ in local:  # TP ranks > 0: take part in the gathers
                pass
        return
    stage, (_, tp_rank) = ps.get_pipeline_model_parallel_rank(), _tp()
    me = torch.distributed.get_rank()
    dev = runtime.device()
    for owner in range(pp):
        if me == 0 and owner == stage:
            yield from local
        elif me == 0:
            # rank 0's PP group holds TP rank 0 of every stage of its replica, in stage order
            src = torch.distributed.get_process_group_ranks(ps.get_pipeline_model_parallel_group())[owner]
            while True:
                header = [None]
                torch.distributed.recv_object_list(header, src=src)
                if header[0] is None:
                    break
                unit = []
                for name, shape, dtype in header[0]:
                    buf = torch.empty(shape, dtype=dtype, device=dev)
                    torch.distributed.recv(buf, src=src)
                    unit.append((name, buf))
                    del buf
                yield unit
                del unit
        elif owner == stage:
            for unit in local:
                if tp_rank != 0:
                    continue
                torch.distributed.send_object_list([[(n, tuple(t.shape), t.dtype) for n, t in unit]], dst=0)
                for _, t in unit:
                    torch.distributed.send(t.to(dev).contiguous(), dst=0)
                del unit
            if tp_rank == 0:
                torch.distributed.send_object_list([None], dst=0)


def megatron_to_hf(model_chunks: list, hf_config: dict) -> dict[str, torch.Tensor]:
    """The full HF state dict (CPU tensors, the model's dtype) on every rank. Collective over TP and PP."""
    return dict(iter_hf_weights(model_chunks, hf_config))


def read_hf_weights(hf_dir) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder's safetensors (`model.safetensors` or a sharded index)."""
    from safetensors.torch import load_file

    d = Path(hf_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d}: no *.safetensors weights")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(d / f)))
    return out
