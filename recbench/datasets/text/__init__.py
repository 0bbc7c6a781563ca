"""The streaming pipeline that turns delimited click logs (Criteo, Avazu, synthetic) into protocol arrays.

One module per job: ``sources`` (files, checksums, line counts), ``formats`` (column layout and
field rules), ``parsing`` (chunked reading, UTF-8 and field validation), ``keys`` (categorical
keys, the Feistel permutation), ``splits``, ``vocabulary``, ``writer`` (streamed ``.npy``) and
``pipeline``, which composes them (its docstring lists every rule).

References: see ``recbench.datasets.text.pipeline``.
"""
