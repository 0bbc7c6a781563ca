"""Performance harness shared by the scripts in ``benchmarks/`` (see ``harness.py``)."""
