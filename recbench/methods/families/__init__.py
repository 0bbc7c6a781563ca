"""Family bases: the shared solver, closed-form memory and module of a family of methods.

``pruning.PruningFamily`` (``pep``, ``deeplight``, ``dsl``, ``autosrh``),
``low_precision.LowPrecisionFamily`` (``lpt``, ``alpt``) and
``product_quantization.ProductQuantizationFamily`` (``dpq``, ``mgqe``). A family base is not a
method: only ``recbench/methods/<name>.py`` modules with a ``recbench/conf/method/<name>.yaml`` are.

References: ``recbench.methods.base`` (the method contract).
"""
