"""The error of bad input data, shared by every dataset module (a leaf: it imports nothing of recbench).

References: docs/robustness.md (what each kind of bad input raises).
"""
from __future__ import annotations


class DatasetError(ValueError):
    """Bad input data: the message names the file, line and field and what is allowed."""
