"""Weight refit: stream the Megatron policy's weights into the rollout engine through THE HF mapping.

Offers:
- `refit(backend, model_chunks, hf_config, bucket_mb, meter)`: a collective over the trainer's ranks. The HF
  tensors are produced one megatron module at a time from the TP/PP shards (`hf_mapping.stream_hf_units`: gathered
  over the module's TP group on the PP stage that owns it, sent to rank 0, which hosts the engine), grouped into
  buckets of at most `bucket_mb` MiB (`buckets`) and loaded bucket by bucket. Rank 0 holds at most one bucket and
  the unit being received, never the whole model. Every rank must call it, also when only rank 0 holds an engine.
- `buckets(units, max_bytes, meter)`: that grouping (a unit is never split; one bigger than a bucket goes alone).
- `RefitMeter`: the bytes of refit tensors alive (by weak reference, so tensors the engine still holds count),
  with their peak: what a test compares with the bucket size.
- `write_engine_dir(hf_config, out_dir, tokenizer)`: the folder an engine starts from.
"""

from __future__ import annotations

import json
import time
import weakref
from pathlib import Path
from typing import Iterable, Iterator

import torch

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


class RefitMeter:
    """Bytes of the refit's tensors still alive, counted per storage (q, k and v can be views of one buffer) and
    released when the last tracked tensor of a storage is garbage-collected, wherever it was held."""

    def __init__(self):
        self.live = 0
        self.peak = 0
        self.largest_unit = 0  # bytes of the biggest unit seen (the bound's second term)
        self.units = 0
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [nbytes, tracked tensors alive]

    def track(self, unit: list[tuple[str, torch.Tensor]]) -> None:
        size = 0
        for _, t in unit:
            storage = t.untyped_storage()
            key = storage.data_ptr()
            entry = self._storages.get(key)
            if entry is None:
                entry = self._storages[key] = [storage.nbytes(), 0]
                self.live += entry[0]
                size += entry[0]
            entry[1] += 1
            weakref.finalize(t, self._release, key)
        self.largest_unit = max(self.largest_unit, size)
        self.units += 1
        self.peak = max(self.peak, self.live)

    def _release(self, key: int) -> None:
        entry = self._storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]


def _nbytes(unit: list[tuple[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for _, t in unit)


def buckets(units: Iterable[list[tuple[str, torch.Tensor]]], max_bytes: int,
            meter: RefitMeter | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Whole units packed into buckets of at most `max_bytes` (a unit bigger than that is a bucket of its own).

    The next unit is requested only once the consumer asked for the next bucket, and the consumer must drop its
    reference to a bucket before asking (see `_drain`): then at most one bucket and one unit are alive."""
    bucket: list = []
    size = 0
    for unit in units:
        if meter is not None:
            meter.track(unit)
        n = _nbytes(unit)
        if bucket and size + n > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket += unit
        size += n
        del unit
    if bucket:
        yield bucket


def _flatten(stream: Iterable[list]) -> Iterator[tuple[str, torch.Tensor]]:
    """Bucket by bucket as one (name, tensor) iterator; a bucket's list is emptied once handed out, so this
    generator keeps no tensor alive while the next bucket is built."""
    for bucket in stream:
        while bucket:
            yield bucket.pop(0)


def refit(backend: RefitBackend | None, model_chunks: list, hf_config: dict, bucket_mb: float = 512,
          meter: RefitMeter | None = None) -> float:
    """Load the policy's current weights into `backend` (None on ranks without an engine). Returns seconds.

    `bucket_mb` (rollout.refit_bucket_mb) bounds what rank 0 holds at once besides the unit being received."""
    from recipes.megatron.hf_mapping import stream_hf_units

    if bucket_mb <= 0:
        raise ValueError(f"rollout.refit_bucket_mb must be > 0, got {bucket_mb}")
    start = time.perf_counter()
    stream = buckets(stream_hf_units(model_chunks, hf_config), int(bucket_mb * 2**20), meter)
    if backend is not None:
        if hasattr(backend, "load_buckets"):  # vLLM: bucket by bucket
            backend.load_buckets(stream)
        else:  # the transformers fallback replaces its whole state dict at once
            backend.load_weights(_flatten(stream))
    for _ in stream:  # finish the collective whatever the engine consumed (ranks without an engine: all of it)
        pass
    return time.perf_counter() - start
