"""References to check a solve against: a small contractive cell, the reversible
iteration as plain code, a relative error, a compiled-memory reading, and cells that
the compiler may evaluate differently in the two passes of a reversal.

revdeq's own tests, benchmarks and experiments use them; so can a user checking a
cell of their own.
"""

from ._cells import (
    AffineCell as AffineCell,
    GroupNormCell as GroupNormCell,
    compiler_sensitive_cells as compiler_sensitive_cells,
)
from ._reference import (
    TanhCell as TanhCell,
    compiled_memory as compiled_memory,
    plain_reversible_loop as plain_reversible_loop,
    relative_error as relative_error,
)
