"""Streamed ``.npy`` output: arrays written by appending row blocks, and spools of category codes.

Arrays are streamed to ``.npy`` files with plain writes (no memory maps), so the page cache of the
outputs never counts against the process.

References: numpy ``.npy`` format version 1.0 (``numpy.lib.format``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np


class NpyStreamWriter:
    """Writes a C-order ``.npy`` file by appending row blocks (no memory map).

    ``shape[0]`` may be None (rows unknown in advance): the header is rewritten with the rows
    written on ``close`` (numpy pads the header so that the first axis can grow in place, so the
    file is byte-identical to one written with the final shape from the start)."""

    def __init__(self, path: Path, dtype: Any, shape: Sequence[Optional[int]]):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self.shape = tuple(None if s is None else int(s) for s in shape)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "wb")
        self._header_bytes = self._write_header(self.shape[0] or 0)
        self.rows = 0

    def _write_header(self, rows: int) -> int:
        np.lib.format.write_array_header_1_0(
            self._handle, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                           "shape": (rows, *self.shape[1:])})
        return self._handle.tell()

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.shape[1:]:
            raise ValueError(f"{self.path}: block shape {block.shape} does not fit {self.shape}")
        self._handle.write(block.data)
        self.rows += block.shape[0]

    def abort(self) -> None:
        """Close without the row check (the caller discards the file)."""
        self._handle.close()

    def close(self) -> None:
        if self.shape[0] is None:
            self._handle.seek(0)
            if self._write_header(self.rows) != self._header_bytes:  # pragma: no cover - numpy pads for growth
                self._handle.close()
                raise RuntimeError(f"{self.path}: the .npy header of {self.rows} rows does not fit in place")
        self._handle.close()
        if self.shape[0] is not None and self.rows != self.shape[0]:
            raise RuntimeError(f"{self.path}: wrote {self.rows} rows, expected {self.shape[0]}")


class CodeSpool:
    """Raw (N, F) uint32 category codes of one split, written in file order and read back in blocks."""

    def __init__(self, path: Path, width: int):
        self.path, self.width, self.rows = path, width, 0
        self._handle = open(path, "wb")

    def append(self, block: np.ndarray) -> None:
        self._handle.write(np.ascontiguousarray(block, dtype=np.uint32).data)
        self.rows += block.shape[0]

    def blocks(self, rows: int) -> Iterator[np.ndarray]:
        self._handle.close()
        with open(self.path, "rb") as handle:
            while True:
                block = np.fromfile(handle, dtype=np.uint32, count=rows * self.width)
                if block.size == 0:
                    break
                yield block.reshape(-1, self.width)

    def close(self) -> None:
        self._handle.close()
        self.path.unlink(missing_ok=True)
