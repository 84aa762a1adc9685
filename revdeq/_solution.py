import equinox as eqx
import optimistix as optx
from jaxtyping import Array, PyTree

from ._custom_types import Y


# Type checkers see the codes inherited from optimistix (`successful`,
# `max_steps_reached`, ...) as `optx.RESULTS`, though at run time they are this
# class's: where one meets this type, a `pyright: ignore` says so.
class RESULTS(optx.RESULTS):  # pyright: ignore[reportGeneralTypeIssues]
    """Result codes of [`revdeq.solve`][]. Read a message with `RESULTS[sol.result]`.

    A fixed-step solve (`rtol = atol = 0`, as in RevDEQ training) that completes its
    `max_steps` steps is `successful`. A solve with tolerances that has not converged
    within `max_steps` is `max_steps_reached`: reported, never raised, since a step
    budget is normal in DEQ training. The other failures raise under `throw=True`.
    An inexact reversible gradient is found in the backward pass, after the
    `Solution` exists: it raises there, or warns under `throw=False`.

    !!! Example

        ```python
        import jax.numpy as jnp
        import revdeq


        def cell(z, x):
            return jnp.tanh(0.5 * z + x)


        z0, x = jnp.zeros(4), jnp.ones(4)

        sol = revdeq.solve(cell, z0, x, max_steps=2, throw=False)
        if sol.result != revdeq.RESULTS.successful:
            print(revdeq.RESULTS[sol.result])  # the budget ran out: not an error
        ```
    """

    diverged = (
        "The iteration diverged: its residual grew far beyond the smallest one seen. "
        "Lower the damping or `beta`, or make the cell contractive (normalise its "
        "weights)."
    )
    nonfinite_value = (
        "A non-finite value (inf or NaN) appeared in `fn(z, args)` or in the state. "
        "Check the cell and `args` for NaN (`jax_debug_nans` finds the first), start "
        "from a smaller `z0`, or lower the damping or `beta`."
    )
    state_out_of_range = (
        "The exact fixed-point state left its representable range, or took in a "
        "non-finite value of `f`. Start from a smaller `z0`, check the cell for "
        "non-finite outputs, or use a `FloatState` precision."
    )


class Solution(eqx.Module):
    """The result of [`revdeq.solve`][].

    **Attributes:**

    - `value`: the fixed-point estimate, a pytree like `z0`.
    - `result`: a [`revdeq.RESULTS`][] code; `RESULTS[sol.result]` reads its message.
    - `stats`: a dict with `num_steps`, `num_fn_evals` (forward evaluations of `fn`)
        and `residual`, the relative residual `‖f(z) − z‖ / ‖f(z)‖` at the last
        evaluated iterate. Under `vmap` each is per sample.

    !!! Example

        ```python
        import jax.numpy as jnp
        import revdeq


        def cell(z, x):
            return jnp.tanh(0.5 * z + x)


        z0, x = jnp.zeros(4), jnp.ones(4)

        sol = revdeq.solve(cell, z0, x, max_steps=8)
        sol.value, sol.stats["num_steps"], sol.stats["residual"]
        ```
    """

    value: Y
    result: RESULTS
    stats: dict[str, PyTree[Array]]
