"""recbench's command-line entry points (thin shells over the library)."""
# Every command (and every sweep worker, which imports its task function from here) starts quiet:
# known third-party notices are dropped by message and module (recbench.quiet says which and why).
from recbench.quiet import quiet_known_warnings as _quiet

_quiet()
