from collections.abc import Callable
from typing import Any, TypeAlias

from jaxtyping import PyTree


Y: TypeAlias = PyTree[Any]
"""A DEQ state: any pytree of floating-point arrays."""

Args: TypeAlias = PyTree[Any]
"""The injected input `args` of a cell `fn(z, args)`."""

Fn: TypeAlias = Callable[[Y, Args], Y]
"""A cell `fn(z, args) -> z`."""

SolverFn: TypeAlias = Callable[[Y, Args], tuple[Y, Any]]
"""A cell in optimistix's convention, `fn(z, args) -> (z, aux)`, as a solver's
`init` and `step` receive it."""
