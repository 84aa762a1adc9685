"""References to check a solve against: a small contractive cell, the reversible
iteration as plain code, a relative error and a compiled-memory reading.

revdeq's own tests, benchmarks and experiments use them; so can a user checking a
cell of their own.
"""

from ._reference import (
    TanhCell as TanhCell,
    compiled_memory as compiled_memory,
    plain_reversible_loop as plain_reversible_loop,
    relative_error as relative_error,
)
