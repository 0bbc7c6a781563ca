"""Sparse mixture-of-experts gates: ``softmax`` (dense baseline), ``topk`` (noisy Top-k), ``hash``
(hash routing by an id field), ``dselect_k`` (DSelect-k) and ``comet`` (COMET), each with
COMET+'s permutation local search (``local_search=True``). Configs: ``conf/gate/<name>.yaml``;
catalogue: ``recbench/gates/README.md``; contract: ``recbench.gates.base``.
"""
