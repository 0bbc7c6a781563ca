"""Split assignment of data lines: ``dlrm_chunks``, ``random`` (8:1:1) and ``given`` (pre-split files).

Splits are assigned by data-line index in the concatenated sources (header lines excluded,
malformed lines included), so a skipped malformed line never moves another row between splits,
and the chunk size never changes the arrays. Rows keep file order inside a split.

- ``dlrm_chunks``: the lines are cut into ``num_chunks`` consecutive chunks of equal size (the
  first ``L % num_chunks`` chunks one line longer; ``num_chunks=None``: one chunk per source
  file, e.g. Criteo Terabyte's days); all chunks but the last are train, the last is halved with
  ``numpy.array_split``: first half test, second half validation, exactly as DLRM's
  ``dlrm_data_pytorch.py`` and Hetu.
- ``random``: line ``i`` goes to train, validation or test by its rank ``pi(i)`` under a keyed
  pseudo-random permutation of ``[0, L)`` (``keys.FeistelPermutation``, seed ``split_seed``):
  ranks below ``L - 2 * (L // 10)`` train, the next ``L // 10`` validation, the rest test (8:1:1
  exactly, in O(1) memory).
- ``given``: the split is the file: exactly three source files, in the order train, validation,
  test (benchmarks distributed pre-split, e.g. BARS's ``Criteo_x1`` and ``Avazu_x4``).

References:
    M. Naumov et al. 2019. Deep Learning Recommendation Model for Personalization and
    Recommendation Systems. arXiv:1906.00091 (the 7-chunk split of Criteo Kaggle);
    facebookresearch/dlrm ``dlrm_data_pytorch.py``.
    X. Miao et al. 2022. HET: Scaling out Huge Embedding Model Training via Cache-enabled
    Distributed Framework. VLDB (Hetu's split, the same).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from recbench.datasets.text.keys import FeistelPermutation

SPLIT_RULES = ("dlrm_chunks", "random", "given")
TRAIN, VAL, TEST = 0, 1, 2  # split codes, in storage.SPLITS order


class SplitAssigner:
    """Maps data-line indices (int64, concatenated sources) to split codes (0 train, 1 val, 2 test).

    Args:
        rule: ``"dlrm_chunks"`` or ``"random"`` (see the module docstring).
        total: data lines L in the concatenated sources (malformed included).
        file_lines: data lines per source file (for ``num_chunks=None`` and ``given``).
        num_chunks: equal chunks for ``dlrm_chunks``; None = one chunk per source file.
        seed: ``split_seed`` of the ``random`` rule.
    """

    def __init__(self, rule: str, total: int, file_lines: Sequence[int], num_chunks: Optional[int], seed: int):
        self.rule, self.total = rule, int(total)
        if rule == "dlrm_chunks":
            if num_chunks is None:
                sizes = list(file_lines)
            else:
                base, extra = divmod(self.total, int(num_chunks))
                sizes = [base + (k < extra) for k in range(int(num_chunks))]
            last_start = int(sum(sizes[:-1]))
            last = self.total - last_start
            self.test_start = last_start
            self.val_start = last_start + (last + 1) // 2  # np.array_split: the first half takes the extra line
        elif rule == "given":
            if len(file_lines) != 3:
                raise ValueError(f"split 'given' needs exactly 3 source files (train, validation, test), "
                                 f"got {len(file_lines)}")
            self.val_start = int(file_lines[0])
            self.test_start = self.val_start + int(file_lines[1])
        elif rule == "random":
            n_val = n_test = self.total // 10
            self.train_end, self.val_end = self.total - n_val - n_test, self.total - n_test
            self.permutation = FeistelPermutation(max(self.total, 1), seed)
        else:
            raise ValueError(f"unknown split rule {rule!r}; allowed: {', '.join(SPLIT_RULES)}")

    def __call__(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        if self.rule == "dlrm_chunks":
            return np.where(index < self.test_start, TRAIN, np.where(index < self.val_start, TEST, VAL)).astype(np.int8)
        if self.rule == "given":
            return np.where(index < self.val_start, TRAIN, np.where(index < self.test_start, VAL, TEST)).astype(np.int8)
        rank = self.permutation(index) if index.size else index
        return np.where(rank < self.train_end, TRAIN, np.where(rank < self.val_end, VAL, TEST)).astype(np.int8)
