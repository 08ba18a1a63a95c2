"""Hugging Face <-> Megatron checkpoints: the one place a model crosses between the two formats.

`import_from_hf(hf_dir, out, tp, pp)`, `export_to_hf(ckpt, out, step=None)`, `init_tiny_checkpoint(hf_config_path,
out_dir, seed)`, `load_pretrained(model_chunks, path)` (a Megatron checkpoint folder or an HF folder),
`write_hf_folder(state_dict, hf_config, out, tokenizer_dir)`. Used by every stage that starts from or writes a
checkpoint (SFT, KD, GRPO, rejection sampling, evaluation) and by `nrr convert`.

The weight mapping itself lives in `recipes.megatron.hf_mapping`. A Megatron checkpoint loads at any TP/PP layout,
so one process is enough for tiny models. The exported folder holds model.safetensors, config.json,
generation_config.json and the model's own tokenizer files (with its chat template): transformers' `AutoModelForCausalLM` and vLLM
load it as is. An export is written beside its target and renamed into place when complete (`write_hf_folder`).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

@contextlib.contextmanager
def _runtime(tp: int, pp: int, seed: int = 0):
    """Use the caller's distributed runtime when there is one, else a single process for the duration."""
    from megatron.core import parallel_state as ps

    from recipes.megatron import runtime

    if ps.model_parallel_is_initialized():
        # building a model reseeds; give the caller's training run its RNG streams back afterwards
        rng = runtime.rng_state()
        try:
            yield ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
        finally:
            runtime.set_rng_state(rng)
        return
    runtime.init_distributed(tp, pp, seed=seed)
    try:
        yield tp, pp
    finally:
        runtime.destroy_distributed()


def _copy_tokenizer(src, dst: Path) -> None:
    """The model's tokenizer files into `dst`, unchanged (src None: the embedded students')."""
    from recipes import tokenizer

    tokenizer.load(src).save(dst)


def _hf_dtype(hf: dict) -> torch.dtype:
    name = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""))


def write_hf_folder(state_dict: dict[str, torch.Tensor], hf_config: dict, out, tokenizer_dir=None) -> Path:
    """An HF model folder: model.safetensors, config.json, generation_config.json, tokenizer + chat template.

    Written whole into `<out>.tmp` beside it, fsynced, then renamed into place (swapped with a previous export):
    a crash mid-export leaves the previous export as it was and no partial folder at `out` (the next export
    removes the `.tmp`). An existing `out` is replaced only when it is an HF model folder (or empty)."""
    from safetensors.torch import save_file

    from recipes.megatron.checkpointing import fsync_tree, recover_dir, replace_dir

    given, out = Path(out), Path(os.path.abspath(out))  # "." or "x/.." have no name to put ".tmp" after
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise FileExistsError(f"{out}: exists and is not an HF model folder (no config.json); "
                              "refusing to replace it with the export")
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(out)  # a crashed export's leftovers
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir()
    dtype = _hf_dtype(hf_config)
    tensors = {k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_config}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    _copy_tokenizer(tokenizer_dir, tmp)
    fsync_tree(tmp)
    replace_dir(tmp, out)
    return given


def _check_tokenizer(hf: dict, tokenizer_dir, where: str) -> None:
    """Fail before any weight moves when the tokenizer has ids the model's embedding cannot hold."""
    from recipes import tokenizer

    try:
        tokenizer.load(tokenizer_dir).check_model_vocab(int(hf["vocab_size"]))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def import_from_hf(hf_dir, out, tp: int = 1, pp: int = 1, step: int = 0) -> Path:
    """HF folder -> Megatron checkpoint (step `step`, model only) with hf_config.json and tokenizer."""
    from recipes.megatron import checkpointing, hf_mapping, providers

    hf = providers.load_hf_config(hf_dir)
    providers.family(hf)
    _check_tokenizer(hf, hf_dir, f"{Path(hf_dir) / 'config.json'}")
    weights = hf_mapping.read_hf_weights(hf_dir)
    with _runtime(tp, pp) as (tp, pp):
        chunks = providers.build_model(hf, tp, pp, seed=0, ddp=False)
        hf_mapping.load_hf_into_megatron(chunks, weights, hf)
        return checkpointing.save_checkpoint(out, step, chunks, hf_config=hf, tokenizer_dir=hf_dir)


def init_tiny_checkpoint(hf_config_path, out_dir, seed: int = 0) -> Path:
    """A randomly initialised Megatron checkpoint (step 0) of an HF config: the demo's base model."""
    from recipes.megatron import checkpointing, providers

    from recipes.tokenizer import tokenizer_folder

    hf = providers.load_hf_config(hf_config_path)
    providers.family(hf)
    tok_dir = tokenizer_folder(hf_config_path)  # the tokenizer shipped beside the config
    _check_tokenizer(hf, tok_dir, str(hf_config_path))
    with _runtime(1, 1, seed) as (tp, pp):
        chunks = providers.build_model(hf, tp, pp, seed=seed, ddp=False)
        return checkpointing.save_checkpoint(out_dir, 0, chunks, hf_config=hf, tokenizer_dir=tok_dir)


def build_adapted_model(hf: dict, lora_cfg, base: dict, tp: int, pp: int, *, ddp: bool = True, dtype=None,
                        config_overrides: dict | None = None, distributed_optimizer: bool = False) -> list:
    """The frozen base model with LoRA adapters (`recipes.megatron.lora`): built from `base["seed"]`, loaded from
    `base["init_checkpoint"]` when set, fingerprinted (the sha256 adapter checkpoints record and are checked
    against), then adapted and (ddp=True) wrapped in DDP, which then holds gradients for the adapters only."""
    from recipes.megatron import lora, providers

    # megatron-core's local layers even where Transformer Engine imports: TE's spec fuses the input norm into
    # linear_qkv / linear_fc1, whose adapters must see the normalised input
    overrides = {**(config_overrides or {}), "transformer_impl": "local"}
    chunks = providers.build_model(hf, tp, pp, seed=base["seed"], ddp=False, dtype=dtype, config_overrides=overrides)
    if base.get("init_checkpoint"):
        load_pretrained(chunks, base["init_checkpoint"])
    sha256 = lora.base_fingerprint(chunks, hf)
    lora.apply_lora(chunks, lora_cfg, seed=base["seed"])
    for model in chunks:
        model.adapter_description = lora.adapter_description(lora_cfg, base, sha256)
    return providers.wrap_ddp(chunks, distributed_optimizer) if ddp else chunks


def adapter_of(ckpt, step: int | None = None) -> dict | None:
    """A LoRA checkpoint step's adapter.json (its LoRA config and base), None for a full checkpoint."""
    from recipes.megatron import checkpointing

    step = checkpointing.latest_step(ckpt) if step is None else step
    path = checkpointing.step_dir(ckpt, step) / checkpointing.ADAPTER_FILE if step is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def _load_adapted(ckpt, adapter: dict, hf: dict, tp: int, pp: int, step: int | None) -> list:
    from recipes.megatron import checkpointing, lora

    chunks = build_adapted_model(hf, lora.LoraConfig(**adapter["lora"]), adapter["base"], tp, pp, ddp=False)
    if checkpointing.load_checkpoint(ckpt, chunks, step=step) is None:
        raise FileNotFoundError(f"{ckpt}: no complete checkpoint (no 'latest' marker)")
    return chunks


def export_lora_adapter(ckpt, out, step: int | None = None, tp: int = 1) -> Path:
    """A LoRA checkpoint's adapters -> a PEFT adapter folder (adapter_config.json, adapter_model.safetensors) for
    the HF export of its base model (collective inside a distributed run, at pp=1)."""
    from recipes.megatron import checkpointing, lora, runtime

    hf = checkpointing.read_hf_config(ckpt)
    adapter = adapter_of(ckpt, step)
    if adapter is None:
        raise ValueError(f"{ckpt}: not a LoRA checkpoint (no {checkpointing.ADAPTER_FILE} in its step): nothing to "
                         "export as an adapter")
    with _runtime(tp, 1) as (tp, _):
        chunks = _load_adapted(ckpt, adapter, hf, tp, 1, step)
        state = lora.peft_state_dict(chunks, hf)
        if runtime.rank() == 0:
            lora.write_peft_adapter(out, state, lora.LoraConfig(**adapter["lora"]),
                                    adapter["base"].get("init_checkpoint"), _hf_dtype(hf))
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    return Path(out)


def export_to_hf(ckpt, out, step: int | None = None, tp: int = 1, pp: int = 1, merge_lora: bool = False) -> Path:
    """Megatron checkpoint -> HF folder. Inside a distributed run it uses the run's layout (collective; rank 0
    writes); otherwise it runs in this process at TP=PP=1. A LoRA checkpoint (adapters only) is exported merged
    into its base with `merge_lora=True`."""
    from recipes.megatron import checkpointing, hf_mapping, providers, runtime

    hf = checkpointing.read_hf_config(ckpt)
    tok_dir = Path(ckpt) / "tokenizer"
    _check_tokenizer(hf, tok_dir, f"{Path(ckpt) / 'hf_config.json'}")
    adapter = adapter_of(ckpt, step)
    if adapter is not None and not merge_lora:
        raise ValueError(f"{ckpt}: a LoRA checkpoint (adapters only): export it merged into its base with "
                         "--merge-lora, or as a PEFT adapter with --lora-adapter")
    with _runtime(tp, pp) as (tp, pp):
        if adapter is not None:
            chunks, loaded = _load_adapted(ckpt, adapter, hf, tp, pp, step), True
        else:
            chunks = providers.build_model(hf, tp, pp, seed=0, ddp=False)
            loaded = checkpointing.load_checkpoint(ckpt, chunks, step=step)
        if loaded is None:
            raise FileNotFoundError(f"{ckpt}: no complete checkpoint (no 'latest' marker)")
        state = hf_mapping.megatron_to_hf(chunks, hf)
        if runtime.rank() == 0:
            write_hf_folder(state, hf, out, tok_dir)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    return Path(out)


def load_pretrained(model_chunks: list, path) -> int | None:
    """Load weights into built chunks from a Megatron checkpoint folder (returns its step) or an HF folder."""
    from recipes.megatron import checkpointing, hf_mapping, providers

    p = Path(path)
    if (p / checkpointing.LATEST).exists():
        step, _ = checkpointing.load_checkpoint(p, model_chunks)
        return step
    if (p / "config.json").exists():
        hf = providers.load_hf_config(p)
        hf_mapping.load_hf_into_megatron(model_chunks, hf_mapping.read_hf_weights(p), hf)
        return None
    raise FileNotFoundError(f"{p}: neither a Megatron checkpoint (no 'latest') nor an HF folder (no config.json)")
