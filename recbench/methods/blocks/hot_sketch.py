"""HotSketches: CAFE's bucketed sketches of the most important ids, with their exclusive rows.

References: Zhang, Liu, Jiang, Miao, Cui, "CAFE: Towards Compact, Adaptive, and Fast Embedding for
Large-scale Recommendation Models", SIGMOD 2024 (section "HotSketch"); the authors' artifact
HugoZHL/CAFE, ArtifactEvaluation/embeddings/sketch.cpp (class ``SS``: ``Insert``, ``decay``,
``batch_insert_val``, ``query``), commit c757c39e9a497202939904ae5b358eff426ccfda.

Two sketches share the slot layout (W buckets x 4 slots of int32 key, fp32 score, int32 exclusive
row; -1 = not hot): the sketch *is* the exclusive table's id map, nothing is stored per id.

``ThresholdSketch`` (CAFE's default, the artifact's ``SS``): an id hashes to bucket ``key % W``. A
slot is occupied while its count is non-zero. Insert (key, v), one value at a time:
the total inserted grows by v; if the key has a slot its count grows by v, and if the count
reaches the threshold k, the id is not hot yet and a free exclusive row exists, it takes the row at
the front of the free-row queue (FIFO); the slot then moves up while its count exceeds the one
before it (buckets stay sorted by count, highest first). Else the key takes the first empty slot
with count v (no promotion, no move). Else, if the last slot (index 3) is not hot, the key
replaces it and inherits its count plus v (no promotion, no move); a hot last slot drops the
newcomer. Before each batch (``insert`` call): if the total inserted since the last decay exceeds
``decay_volume * W * k``, every count is multiplied by ``decay`` (in double, stored as fp32), hot
ids whose decayed count falls below k lose their row (pushed to the back of the queue, in bucket
then slot order), and the total restarts at 0. The insert is a Python loop over the values (the
reference's sequential semantics: the order of values decides promotions and row numbers).

``HotSketch`` (recbench's top-H variant; the option ``promotion: top_h`` of ``cafe``): an id
hashes to one bucket (universal hash, ``hashing_fns``); empty slots have key -1.
Insert (id, s): if the id has a slot, its score grows by s; else it takes an empty slot with
score s; else the bucket's lowest-scored slot is contested. ``replacement: decay`` (HeavyKeeper's
exponential weakening, base 1.08; not in the CAFE artifact at the commit above): with probability
1.08^-score_min that score shrinks by s, and the newcomer takes the slot (with what is left of s)
only when it reaches 0, so a stream of cold ids cannot push out a heavy one.
``replacement: space_saving``: the newcomer always takes the slot and inherits score_min + s
(Space-Saving within the bucket). A replaced id leaves the sketch (and, if hot, its exclusive
row). Scores decay by a factor per step. ``hot_plan(H)`` returns which slots should gain or lose
an exclusive row so that exactly the (at most) H highest-scored ids are hot. A batch is inserted
vectorised in rounds: round r takes the r-th id of every bucket, so the ids of one round touch
distinct buckets; the result equals inserting them one by one in that order.

Shapes: keys/rows/scores buffers (W, C); inserts take keys (N,) and scores (N,).
"""
from __future__ import annotations

from array import array
from typing import Dict, Tuple

import torch
from torch import nn

from recbench.methods.blocks import hashing_fns

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


class ThresholdSketch(nn.Module):
    """CAFE's HotSketch as in the artifact: W buckets x 4 slots of (key, count, row), promotion when
    a count reaches ``threshold``, a FIFO queue of free exclusive rows (see the module docstring).

    Args:
        buckets: W (bucket of a key: ``key % W``).
        rows: H, exclusive rows handed out (0..H-1, queued in that order).
        threshold: k, the count at which an id becomes hot.
        decay: factor applied to every count at a decay.
        decay_volume: a decay happens before a batch once the total inserted exceeds
            ``decay_volume * W * k``.
    """

    SLOTS = 4

    def __init__(self, buckets: int, rows: int, threshold: float, decay: float = 0.99, decay_volume: float = 10.0):
        super().__init__()
        if buckets < 1 or rows < 1 or not threshold > 0:
            raise ValueError(f"ThresholdSketch needs >= 1 bucket and row and threshold > 0, got buckets={buckets}, "
                             f"rows={rows}, threshold={threshold}")
        self.num_buckets, self.num_rows = int(buckets), int(rows)
        self.threshold, self.decay_factor, self.decay_volume = float(threshold), float(decay), float(decay_volume)
        self.register_buffer("keys", torch.zeros(buckets, self.SLOTS, dtype=torch.int32))
        self.register_buffer("scores", torch.zeros(buckets, self.SLOTS, dtype=torch.float32))
        self.register_buffer("rows", torch.full((buckets, self.SLOTS), -1, dtype=torch.int32))
        # training-only state: the free-row queue (circular: head, length) and the total inserted
        self.register_buffer("free", torch.arange(rows, dtype=torch.int32))
        self.register_buffer("queue", torch.tensor([0, rows], dtype=torch.int64))
        self.register_buffer("total", torch.zeros((), dtype=torch.float64))

    def bucket(self, keys: torch.Tensor) -> torch.Tensor:
        return keys.long() % self.num_buckets

    def nbytes(self) -> int:
        """Inference bytes: the slots (key, count, row)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.scores, self.rows))

    def training_nbytes(self) -> int:
        """Bytes of the training-only state (free-row queue, its head and length, the total)."""
        return sum(t.numel() * t.element_size() for t in (self.free, self.queue, self.total))

    @staticmethod
    def training_bytes_of(rows: int) -> int:
        return 4 * int(rows) + 2 * 8 + 8

    def lookup(self, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(rows (N,) int64, -1 when not hot; counts (N,), 0 when not tracked) of ``keys`` (N,)."""
        buckets = self.bucket(keys)
        match = (self.keys[buckets] == keys.unsqueeze(1).to(torch.int32)) & (self.scores[buckets] != 0)
        found = match.any(1)
        slot = match.to(torch.int8).argmax(1)
        rows = torch.where(found, self.rows[buckets, slot].long(), torch.full_like(keys, -1, dtype=torch.int64))
        scores = torch.where(found, self.scores[buckets, slot], torch.zeros((), dtype=self.scores.dtype))
        return rows, scores

    def hot_map(self) -> Dict[int, int]:
        """{key: exclusive row} of the hot ids."""
        hot = self.rows >= 0
        return dict(zip(self.keys[hot].tolist(), self.rows[hot].tolist()))

    # ----- the free-row queue -----
    def _push(self, rows: torch.Tensor) -> None:
        head, length = int(self.queue[0]), int(self.queue[1])
        at = (head + length + torch.arange(rows.numel())) % self.num_rows
        self.free[at] = rows.to(torch.int32)
        self.queue[1] = length + rows.numel()

    @torch.no_grad()
    def decay(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Multiply every count by ``decay``; hot ids falling below the threshold lose their row.
        Returns their (keys, rows)."""
        scaled = self.scores.double() * self.decay_factor
        lost = (self.rows >= 0) & (scaled < self.threshold)
        keys, rows = self.keys[lost].long(), self.rows[lost].long()  # bucket-major, slot-minor
        self._push(rows)
        self.rows[lost] = -1
        self.scores.copy_(scaled.float())
        self.total.zero_()
        return keys, rows

    @torch.no_grad()
    def insert(self, keys: torch.Tensor, values: torch.Tensor):
        """Insert the values (N,) of ``keys`` (N,) in order (a key may repeat).

        Returns (promoted keys, promoted rows, demoted keys, demoted rows), int64: ids that became
        hot in this batch with their new rows, in order, and ids that lost their row at the decay
        before it.
        """
        demoted_keys = demoted_rows = torch.zeros(0, dtype=torch.int64)
        if float(self.total) > self.decay_volume * self.num_buckets * self.threshold:
            demoted_keys, demoted_rows = self.decay()
        if not keys.numel():
            return demoted_keys, demoted_rows, demoted_keys, demoted_rows
        # the touched buckets as Python containers (fp32 counts in an array('f'): each store rounds
        # to fp32, and an op on fp32 values done in double then rounded once is the fp32 op)
        touched, local = torch.unique(self.bucket(keys), return_inverse=True)
        K, R = self.keys[touched].flatten().tolist(), self.rows[touched].flatten().tolist()
        C = array("f", self.scores[touched].flatten().numpy().tobytes())
        free = self.free.tolist()
        head, length = int(self.queue[0]), int(self.queue[1])
        k, capacity, total = self.threshold, self.num_rows, float(self.total)
        promoted_keys, promoted_rows = [], []
        for key, v, b in zip(keys.tolist(), values.detach().to(torch.float32).tolist(), (4 * local).tolist()):
            total += v
            i = b
            while i < b + 4 and not (C[i] != 0 and K[i] == key):
                i += 1
            if i < b + 4:
                C[i] += v
                if C[i] >= k and length > 0 and R[i] < 0:
                    R[i] = free[head]
                    promoted_keys.append(key)
                    promoted_rows.append(free[head])
                    head, length = (head + 1) % capacity, length - 1
                while i > b and C[i] > C[i - 1]:
                    C[i], C[i - 1] = C[i - 1], C[i]
                    K[i], K[i - 1] = K[i - 1], K[i]
                    R[i], R[i - 1] = R[i - 1], R[i]
                    i -= 1
                continue
            i = b
            while i < b + 4 and C[i] != 0:
                i += 1
            if i < b + 4:
                C[i], K[i] = v, key
            elif R[b + 3] < 0:
                C[b + 3] += v
                K[b + 3] = key
        shape = (touched.numel(), self.SLOTS)
        self.keys[touched] = torch.tensor(K, dtype=torch.int32).view(shape)
        self.rows[touched] = torch.tensor(R, dtype=torch.int32).view(shape)
        self.scores[touched] = torch.frombuffer(bytearray(C.tobytes()), dtype=torch.float32).view(shape)
        self.queue[0], self.queue[1] = head, length
        self.total.fill_(total)
        as_long = lambda xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731
        return as_long(promoted_keys), as_long(promoted_rows), demoted_keys, demoted_rows
