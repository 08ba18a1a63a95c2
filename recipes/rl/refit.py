"""Weight refit: stream the Megatron policy's weights into the rollout engine through THE HF mapping.

`iter_hf_weights` gathers every tensor over TP (all-gather) and PP (broadcast) and yields HF names, so
one rollout engine (on rank 0) can take the weights of any trainer layout. It is a collective: every
rank must drain it, also when only rank 0 holds an engine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from recipes.generation.backend import RefitBackend


def write_engine_dir(hf_config: dict, out_dir: str | Path, tokenizer) -> Path:
    """The config + tokenizer folder a rollout engine starts from (weights arrive by refit, not from disk): the
    model's own tokenizer files, so the engine tokenizes, stops and detokenizes as the trainer does."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {**hf_config, "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save(out)
    return out


def refit(backend: RefitBackend | None, model_chunks: list, hf_config: dict) -> float:
    """Load the policy's current weights into `backend` (None on ranks without an engine). Returns seconds."""
    from recipes.megatron.hf_mapping import iter_hf_weights

    start = time.perf_counter()
    weights = iter_hf_weights(model_chunks, hf_config)
    if backend is not None:
        backend.load_weights(weights)
    for _ in weights:  # finish the collective whatever the engine consumed
        pass
    return time.perf_counter() - start
