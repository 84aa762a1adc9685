import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from ._adjoint.base import AbstractAdjoint
from ._adjoint.implicit import ImplicitAdjoint
from ._adjoint.reversible import ReversibleAdjoint
from ._custom_types import Args, Fn, Y
from ._iterate import resolve_unroll
from ._solution import RESULTS, Solution
from ._solver.base import AbstractSolver
from ._solver.reversible import Reversible
from ._tree import tree_stop_gradient


@eqx.filter_jit
def solve(
    fn: Fn,
    z0: Y,
    args: Args = None,
    *,
    solver: AbstractSolver = Reversible(),
    adjoint: AbstractAdjoint | None = None,
    max_steps: int = 8,
    unroll: bool | None = None,
    throw: bool = True,
) -> Solution:
    """Find a fixed point `z* = fn(z*, args)`, differentiably.

    The one entry point of revdeq: a forward `solver` finds the fixed point from `z0`,
    and the `adjoint` decides how gradients flow back through that solve. It works
    under `jit`, `vmap` (statistics are then per sample) and `grad`.

    **Arguments:**

    - `fn`: the cell, `fn(z, args) -> z`, returning a pytree of the structure, shapes
        and dtypes of `z`. When `fn` is an `eqx.Module`, its array leaves are
        parameters and receive gradients; arrays it closes over do too.
    - `z0`: the initial state, any pytree of real floating-point arrays.
    - `args`: the input injected into every call of `fn`.
    - `solver`: the forward solver: [`revdeq.Reversible`][] (default),
        [`revdeq.Anderson`][], [`revdeq.Broyden`][] or
        [`revdeq.FixedPointIteration`][].
    - `adjoint`: the gradient rule; `None` picks [`revdeq.ReversibleAdjoint`][] for
        `Reversible` and [`revdeq.ImplicitAdjoint`][] otherwise.
    - `max_steps`: the budget of solver steps, at least 1. With `rtol = atol = 0`
        the solve runs exactly this many steps and is `successful`. With
        tolerances, not converging within it is reported as
        `RESULTS.max_steps_reached`, never raised: it is the normal budget of DEQ
        training.
    - `unroll`: run the solver's loop (and the reversible backward pass) as
        straight-line code rather than a `lax.while_loop`. `None` unrolls a
        fixed-step solve (`rtol = atol = 0`) of at most 4 steps
        (`revdeq.internal.UNROLL_MAX_STEPS`), with either precision: on CPU, XLA
        runs a convolution several times faster there than in a loop body (see the
        FAQ). Compile time grows faster than the steps unrolled, and an unrolled
        solve with tolerances still computes all `max_steps` steps.
    - `throw`: raise on failure (non-finite values, divergence, inexact gradients);
        with `False` the failure is reported in `Solution.result` instead.

    **Returns:**

    A [`revdeq.Solution`][] with `value`, `result` and `stats`. The statistics are not
    differentiable.

    !!! Example

        ```python
        import jax.numpy as jnp
        import revdeq

        def cell(z, x):
            return jnp.tanh(0.5 * z + x)

        sol = revdeq.solve(cell, jnp.zeros(4), jnp.arange(4.0), max_steps=16)
        sol.value, sol.stats["num_fn_evals"], revdeq.RESULTS[sol.result]
        ```
    """
    if not isinstance(solver, AbstractSolver):
        raise ValueError(
            "`solver` must be a revdeq solver (Reversible, Anderson, Broyden, "
            f"FixedPointIteration), got {type(solver).__name__}."
        )
    if adjoint is None:
        adjoint = (
            ReversibleAdjoint() if isinstance(solver, Reversible) else ImplicitAdjoint()
        )
    elif not isinstance(adjoint, AbstractAdjoint):
        raise ValueError(
            f"`adjoint` must be a revdeq adjoint, got {type(adjoint).__name__}."
        )
    unroll = resolve_unroll(unroll, solver, max_steps)
    _check_state(z0)
    fn = eqx.filter_closure_convert(fn, z0, args)
    _check_output(jax.eval_shape(fn, z0, args), z0)

    out = adjoint.apply(
        fn, solver, z0, args, max_steps=max_steps, unroll=unroll, throw=throw
    )
    value = out.value
    result, stats = tree_stop_gradient((out.result, out.stats()))
    if throw:
        failed = (result != RESULTS.successful) & (result != RESULTS.max_steps_reached)
        value = result.error_if(value, failed)
    return Solution(value, result, stats)


def _check_state(z0: Y) -> None:
    leaves = jtu.tree_leaves(z0)
    if not leaves:
        raise ValueError("`z0` must contain at least one array.")
    for path, leaf in jtu.tree_leaves_with_path(z0):
        where = f"`z0{jtu.keystr(path)}`"
        if eqx.is_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            raise ValueError(
                f"`z0` must be real; the leaf at {where} is {leaf.dtype}. Solve for "
                "the real and imaginary parts as a pair of real arrays, e.g. "
                '`{"re": z.real, "im": z.imag}`.'
            )
        if not eqx.is_array(leaf) or not jnp.issubdtype(leaf.dtype, jnp.floating):
            kind = getattr(leaf, "dtype", type(leaf).__name__)
            raise ValueError(
                f"`z0` must be a pytree of floating-point arrays; the leaf at {where} "
                f"is {kind}. Convert it, e.g. with `jnp.asarray(z0, jnp.float32)`."
            )


def _check_output(out_struct: PyTree[jax.ShapeDtypeStruct], z0: Y) -> None:
    expected = jax.eval_shape(lambda: z0)
    if jtu.tree_structure(out_struct) != jtu.tree_structure(expected):
        raise ValueError(
            "`fn(z, args)` must return a pytree of the same structure as `z0`: got "
            f"{jtu.tree_structure(out_struct)}, expected "
            f"{jtu.tree_structure(expected)}."
        )
    for (path, out), exp in zip(
        jtu.tree_leaves_with_path(out_struct), jtu.tree_leaves(expected)
    ):
        if out.shape != exp.shape or out.dtype != exp.dtype:
            raise ValueError(
                f"`fn(z, args)` must return the shapes and dtypes of `z0`: at "
                f"`z{jtu.keystr(path)}` it returned {out.dtype}{list(out.shape)}, "
                f"while `z0` has {exp.dtype}{list(exp.shape)}. Cast or reshape the "
                "cell's output."
            )
