"""Building blocks shared by the compression methods; none of them is a method.

``tables`` (fused TorchRec/FBGEMM tables), ``per_id`` (per-id lookups pooled per bag), ``budget``
(the budget solver's pure pieces), ``sparse_storage``/``row_subset``/``bit_packing`` (compact
deployable storage), ``hashing_fns``/``hot_sketch`` (hash families, CAFE's sketches),
``id_gradients``/``batch_part``/``sync_batch_norm`` (per-id statistics and distributed batches),
``projection``, ``dedup_lsh``, ``evolutionary``, ``quantized_tables`` (n-bit bytes and the
``method.quantize`` solver) and ``collisions``.

References: ``recbench.methods.base`` (the method contract).
"""
