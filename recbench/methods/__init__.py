"""The compression methods: one module per ``conf/method/<name>.yaml``.

``base`` is the contract; ``families`` holds the bases shared by a family of methods (pruning,
low precision, product quantization); ``blocks`` holds the building blocks (tables, per-id
lookups, budget solver pieces, storage formats, hash functions).

References: ``recbench.methods.base``.
"""
