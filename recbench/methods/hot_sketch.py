"""HotSketch: CAFE's bucketed sketch of the most important ids, with their exclusive rows.

References: Zhang, Liu, Jiang, Miao, Cui, "CAFE: Towards Compact, Adaptive, and Fast Embedding for
Large-scale Recommendation Models", SIGMOD 2024 (section "HotSketch"; reference implementation
``sketch.cpp`` of the authors' CAFE repository: ``batch_insert_val``/``batch_query``).

Structure: W buckets of C slots (C = 4 in the paper: one cache line). A slot holds an id (int32
key, -1 when empty), its importance score (fp32) and, when the id is hot, the row of the
exclusive table it owns (int32, -1 otherwise): the sketch *is* the exclusive table's id map, so
no per-id structure exists. An id hashes to one bucket (universal hash, ``hashing_fns``).
Insert (id, s): if the id has a slot, its score grows by s; else it takes an empty slot with
score s; else the bucket's lowest-scored slot is contested. ``replacement: decay`` (default; the
exponential-weakening rule of the Python ``Sketch`` in the authors' repository, HeavyKeeper-style,
base 1.08): with probability 1.08^-score_min that score shrinks by s, and the newcomer takes the
slot (with what is left of s) only when it reaches 0, so a stream of cold ids cannot push out a
heavy one. ``replacement: space_saving``: the newcomer always takes the slot and inherits
score_min + s (Space-Saving within the bucket). A replaced id leaves the sketch (and, if hot,
its exclusive row). Scores decay by a factor per
step, so the sketch follows drifting hot sets. ``hot_plan(H)`` returns which slots should gain or
lose an exclusive row so that exactly the (at most) H highest-scored ids are hot: the paper's
score threshold, adjusted to the capacity (the reference's ``adjust_thres``).

A batch of ids is inserted vectorised in rounds: round r takes the r-th id of every bucket, so
the ids of one round touch distinct buckets; the result equals inserting them one by one in
that order.

Shapes: keys/rows/scores buffers (W, C); inserts take unique ids (U,) and scores (U,).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from recbench.methods import hashing_fns

SLOT_BYTES = 12  # int32 key + fp32 score + int32 row


class HotSketch(nn.Module):
    """W buckets x C slots of (key, score, row).

    Args:
        buckets: W.
        slots: C, slots per bucket.
        seed: seed of the bucket hash.
    """

    REPLACEMENTS = ("decay", "space_saving")

    def __init__(self, buckets: int, slots: int = 4, seed: int = 0, replacement: str = "decay",
                 decay_base: float = 1.08):
        super().__init__()
        if replacement not in self.REPLACEMENTS:
            raise ValueError(f"HotSketch replacement={replacement!r}; allowed: {', '.join(self.REPLACEMENTS)}")
        self.replacement, self.decay_base = replacement, float(decay_base)
        self.generator = torch.Generator().manual_seed(int(seed) + 7919)
        if buckets < 1 or slots < 1:
            raise ValueError(f"HotSketch needs >= 1 bucket and slot, got buckets={buckets}, slots={slots}")
        self.num_buckets, self.num_slots = int(buckets), int(slots)
        a, b = hashing_fns.draw(seed, (1,))
        self.register_buffer("a", a, persistent=False)
        self.register_buffer("b", b, persistent=False)
        self.register_buffer("keys", torch.full((buckets, slots), -1, dtype=torch.int32))
        self.register_buffer("scores", torch.zeros(buckets, slots, dtype=torch.float32))
        self.register_buffer("rows", torch.full((buckets, slots), -1, dtype=torch.int32))

    def bucket(self, keys: torch.Tensor) -> torch.Tensor:
        return hashing_fns.universal(keys, self.a, self.b, self.num_buckets)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.scores, self.rows))

    # ----- queries -----
    def lookup(self, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(rows (N,) int64, -1 when not hot; scores (N,), 0 when not tracked) of ``keys`` (N,)."""
        buckets = self.bucket(keys)
        match = self.keys[buckets] == keys.unsqueeze(1).to(torch.int32)
        found = match.any(1)
        slot = match.to(torch.int8).argmax(1)
        rows = torch.where(found, self.rows[buckets, slot].long(), torch.full_like(keys, -1))
        scores = torch.where(found, self.scores[buckets, slot], torch.zeros((), dtype=self.scores.dtype))
        return rows, scores

    def top_keys(self, k: int) -> torch.Tensor:
        """The (at most) k tracked keys with the highest scores."""
        flat_keys, flat_scores = self.keys.flatten(), self.scores.flatten()
        valid = (flat_keys >= 0).nonzero().flatten()
        order = torch.argsort(flat_scores[valid], descending=True, stable=True)[:k]
        return flat_keys[valid[order]].long()

    # ----- updates -----
    @torch.no_grad()
    def insert(self, keys: torch.Tensor, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Add ``values`` (U,) to the scores of unique ``keys`` (U,).

        Returns (keys, rows) of hot ids replaced by this insert (they lost their exclusive row).
        """
        if not keys.numel():
            empty = torch.zeros(0, dtype=torch.int64)
            return empty, empty
        buckets = self.bucket(keys)
        order = torch.argsort(buckets, stable=True)
        keys, values, buckets = keys[order], values[order].float(), buckets[order]
        first = torch.searchsorted(buckets, buckets, right=False)
        rank = torch.arange(keys.numel()) - first
        lost_keys, lost_rows = [], []
        for r in range(int(rank.max()) + 1):
            sel = rank == r
            k, v, b = keys[sel], values[sel], buckets[sel]
            slot_keys, slot_scores = self.keys[b], self.scores[b]
            hit = slot_keys == k.unsqueeze(1).to(torch.int32)
            empty = slot_keys < 0
            has_hit, has_empty = hit.any(1), empty.any(1)
            low = slot_scores.argmin(1)
            slot = torch.where(has_hit, hit.to(torch.int8).argmax(1),
                               torch.where(has_empty, empty.to(torch.int8).argmax(1), low))
            old = slot_scores.gather(1, slot.unsqueeze(1)).squeeze(1)
            replaced = ~has_hit & ~has_empty
            old_rows = self.rows[b, slot]
            new_score, take = old + v, torch.ones_like(has_hit)
            if self.replacement == "decay":
                # exponential weakening: the lowest slot's score shrinks by v with probability
                # decay_base^-score; the newcomer takes the slot only once that score is used up
                shrink = torch.rand(k.numel(), generator=self.generator) < self.decay_base ** (-old.double())
                left = old - v
                evict = replaced & shrink & (left <= 0)
                take = has_hit | has_empty | evict
                new_score = torch.where(has_hit | has_empty, old + v,
                                        torch.where(evict, -left, torch.where(replaced & shrink, left, old)))
            gone = replaced & take & (old_rows >= 0)
            if gone.any():
                lost_keys.append(self.keys[b[gone], slot[gone]].long())
                lost_rows.append(old_rows[gone].long())
            self.scores[b, slot] = new_score
            self.keys[b, slot] = torch.where(take, k.to(torch.int32), self.keys[b, slot])
            self.rows[b, slot] = torch.where(has_hit | ~take, old_rows, torch.full_like(old_rows, -1))
        cat = lambda parts: torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)  # noqa: E731
        return cat(lost_keys), cat(lost_rows)

    def decay(self, factor: float) -> None:
        self.scores.mul_(float(factor))

    def hot_plan(self, capacity: int) -> Tuple[torch.Tensor, torch.Tensor, float]:
        """(promote, demote, threshold): flat slot indices that should gain / lose an exclusive
        row so the hot set is the (at most) ``capacity`` highest-scored tracked ids, and the
        lowest score of that set (the effective hot threshold; inf when it is empty)."""
        flat_keys, flat_scores, flat_rows = self.keys.flatten(), self.scores.flatten(), self.rows.flatten()
        valid = ((flat_keys >= 0) & (flat_scores > 0)).nonzero().flatten()
        hot_now = flat_rows >= 0
        # current owners first on ties, so equal scores do not swap rows back and forth
        rank_key = flat_scores[valid].double() + hot_now[valid].double() * 1e-12
        top = valid[torch.argsort(rank_key, descending=True, stable=True)[:capacity]]
        target = torch.zeros_like(hot_now)
        target[top] = True
        threshold = float(flat_scores[top].min()) if top.numel() else float("inf")
        return (target & ~hot_now).nonzero().flatten(), (hot_now & ~target).nonzero().flatten(), threshold
