"""Sparse mixture-of-experts gates: ``softmax`` (dense baseline), ``topk`` (noisy Top-k),
``topk_plain`` (the COMET reference's Top-k: no noise, no balancing loss), ``hash`` (hash routing
by an id field), ``dselect_k`` (DSelect-k) and ``comet`` (COMET), each with COMET+'s permutation
local search (``gate.local_search.enabled=true``). Configs: ``recbench/conf/gate/<name>.yaml``; catalogue:
``recbench/gates/README.md``; contract: ``recbench.gates.base``.
"""
