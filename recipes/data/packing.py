"""Sequence packing: variable-length examples into fixed rows of `seq_length` tokens.

Packed rows hold several documents. Each document keeps its own position ids (restarting at 0) and
may only attend to itself: on the local (CPU) path that is a block-diagonal causal mask, on GPU
Transformer Engine takes the same boundaries as `cu_seqlens` (THD layout). Padded rows hold one
example each. Either way the loss over a batch is the same: only the loss-mask tokens count.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Example:
    """One tokenized conversation, already shifted: `labels[i]` is the token after `input_ids[i]`."""

    input_ids: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n]
    loss_mask: np.ndarray  # float32 [n], 1 where labels[i] is an assistant token
    source: str = ""  # file:line it came from

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclasses.dataclass
class Row:
    """One row of a batch: `seq_length` tokens holding one or more documents and trailing padding."""

    tokens: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    position_ids: np.ndarray
    segment_ids: np.ndarray  # document index per token; padding is its own last segment
    doc_lengths: list[int]  # lengths of the documents (padding excluded)


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bin packing: items longest first, each into the first bin with room. Returns item indices per bin.

    A max segment tree over the bins' remaining room finds the first fitting bin in O(log n), so
    packing a corpus of 10^5 examples takes well under a second.
    """
    if any(n > capacity for n in lengths):
        raise ValueError(f"an item of length {max(lengths)} exceeds the bin capacity {capacity}")
    n_items = len(lengths)
    size = 1
    while size < max(n_items, 1):
        size *= 2
    tree = np.full(2 * size, capacity, dtype=np.int64)  # every bin starts empty (full room)
    bins: list[list[int]] = []
    order = sorted(range(n_items), key=lambda i: (-lengths[i], i))
    for item in order:
        need = lengths[item]
        node = 1
        while node < size:  # descend to the leftmost leaf with room >= need
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(item)
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


def _row(examples: list[Example], seq_length: int, pad_id: int) -> Row:
    used = sum(len(e) for e in examples)
    if used > seq_length:
        raise ValueError(f"documents of {used} tokens do not fit a row of {seq_length}")
    pad = seq_length - used
    tokens = np.full(seq_length, pad_id, dtype=np.int64)
    labels = np.full(seq_length, pad_id, dtype=np.int64)
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    position_ids = np.zeros(seq_length, dtype=np.int64)
    segment_ids = np.zeros(seq_length, dtype=np.int64)
    at = 0
    for i, e in enumerate(examples):
        n = len(e)
        tokens[at : at + n] = e.input_ids
        labels[at : at + n] = e.labels
        loss_mask[at : at + n] = e.loss_mask
        position_ids[at : at + n] = np.arange(n)
        segment_ids[at : at + n] = i
        at += n
    position_ids[at:] = np.arange(pad)
    segment_ids[at:] = len(examples)
    return Row(tokens, labels, loss_mask, position_ids, segment_ids, [len(e) for e in examples])


def pack(examples: list[Example], seq_length: int, pad_id: int) -> list[Row]:
    """First-fit-decreasing packing; documents keep their original order inside a row."""
    bins = first_fit_decreasing([len(e) for e in examples], seq_length)
    return [_row([examples[i] for i in sorted(b)], seq_length, pad_id) for b in bins]


def pad(examples: list[Example], seq_length: int, pad_id: int) -> list[Row]:
    """One example per row, padded to `seq_length`."""
    return [_row([e], seq_length, pad_id) for e in examples]


def useful_fraction(rows: list[Row]) -> float:
    """Share of row tokens that belong to a document (not padding)."""
    total = sum(len(r.tokens) for r in rows)
    return sum(sum(r.doc_lengths) for r in rows) / max(total, 1)


def cu_seqlens(rows: list[Row]) -> np.ndarray:
    """Cumulative segment boundaries over the flattened micro batch (THD layout for TE on GPU).

    Padding counts as one more segment so the boundaries cover every token.
    """
    bounds = [0]
    for r in rows:
        base = bounds[-1]
        at = 0
        for n in r.doc_lengths:
            at += n
            bounds.append(base + at)
        if at < len(r.tokens):
            bounds.append(base + len(r.tokens))
    return np.asarray(bounds, dtype=np.int32)


def collate(rows: list[Row]) -> dict:
    """Rows -> the batch dict the training step takes (torch tensors).

    Rows with one document each (padded mode) need no mask beyond the usual causal one, so their
    `attention_mask` is None and the fused causal attention path can be used. Packed rows get the
    block-diagonal causal mask, and, for a single-row micro batch, `cu_seqlens` (Transformer
    Engine's THD path takes one packed row per micro batch).
    """
    import torch

    from recipes.megatron.train_step import packed_attention_mask

    batch = {
        "tokens": torch.from_numpy(np.stack([r.tokens for r in rows])),
        "labels": torch.from_numpy(np.stack([r.labels for r in rows])),
        "loss_mask": torch.from_numpy(np.stack([r.loss_mask for r in rows])),
        "position_ids": torch.from_numpy(np.stack([r.position_ids for r in rows])),
        "attention_mask": None,
    }
    if any(len(r.doc_lengths) > 1 for r in rows):
        batch["attention_mask"] = packed_attention_mask(torch.from_numpy(np.stack([r.segment_ids for r in rows])))
        if len(rows) == 1:
            batch["cu_seqlens"] = torch.from_numpy(cu_seqlens(rows))
    return batch
