"""Property tests: generated inputs for `Reversible` + `ReversibleAdjoint`.

For every case, exactly one of two outcomes is allowed: the reconstruction is bit
for bit and the gradient matches autodiff of a plain float64 loop, or the solve
reports one of the documented failures and raises under `throw=True`. Never a
silent wrong gradient. Run with `pytest -m slow`; the default profile tries 10
cases from a fixed seed;
`HYPOTHESIS_PROFILE=thorough pytest tests/test_properties.py -m slow
--hypothesis-show-statistics` tries 300 and counts the outcomes, from a random seed
(`--hypothesis-seed=N` fixes it).
"""

import os
import warnings

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import (
    HealthCheck,
    Phase,
    event,
    given,
    note,
    settings,
    strategies as st,
)

import revdeq
from revdeq.testing import plain_reversible_loop, relative_error


settings.register_profile(
    "ci",
    max_examples=10,
    deadline=None,
    derandomize=True,
    # Each case compiles; shrinking a failure would recompile hundreds of times.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# Seeded rather than derandomised: `--hypothesis-seed` picks the cases, so runs
# with different seeds explore different ones, side by side.
settings.register_profile(
    "thorough",
    parent=settings.get_profile("ci"),
    max_examples=300,
    derandomize=False,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_FAILURES = (
    revdeq.RESULTS.state_out_of_range,
    revdeq.RESULTS.nonfinite_value,
    revdeq.RESULTS.diverged,
)
# Agreement of the gradient with the float64 truth, by the dtype `f` computes in.
_GRADIENT_RTOL = {"float64": 1e-9, "float32": 1e-3, "bfloat16": 1e-1}


class _ScaledCell(eqx.Module):
    """`m · tanh(w ⊙ roll(z / m) + x)` (the `affine` form: a multiply-add that XLA
    fuses into one FMA in some programs and not in others) or `m · tanh(W (z / m) +
    x)` (the `dot` form: a scalar factor beside a dot product, which XLA may move
    across it) on a flattened pytree state, with arbitrary float weights:
    contractive, with its fixed point of magnitude `m`, and each element driven by
    others, across leaves. A fault makes it return `fault` (inf or NaN) once the
    state's size passes `trigger · m`, partway along the path to the fixed point.

    Nothing here keeps XLA from evaluating `f` differently in the forward and the
    backward pass; `ExactState`'s guard bits must absorb it.
    """

    weight: jax.Array
    magnitude: float = eqx.field(static=True)
    fault: float | None = eqx.field(static=True)
    trigger: float = eqx.field(static=True)

    def __call__(self, z, x):
        flat, unravel = jax.flatten_util.ravel_pytree(z)
        m = jnp.asarray(self.magnitude, flat.dtype)
        weight = self.weight.astype(flat.dtype)
        if weight.ndim == 1:
            pre = weight * jnp.roll(flat / m, 1)
        else:
            pre = weight @ (flat / m)
        out = m * jnp.tanh(pre + x)
        if self.fault is not None:
            size = jnp.max(jnp.abs(flat / m))
            out = jnp.where(
                size > self.trigger, jnp.asarray(self.fault, out.dtype), out
            )
        return unravel(out)


@st.composite
def _cases(draw):
    edges = st.sampled_from([0.01, 0.5, 0.99, 1.01, 1.5, 1.99])
    inner = st.floats(0.01, 1.99).filter(lambda b: abs(b - 1) >= 0.01)
    return dict(
        beta=draw(st.one_of(edges, inner)),
        steps=draw(st.one_of(st.sampled_from([1, 200]), st.integers(1, 200))),
        shapes=draw(
            st.lists(st.sampled_from([(), (1,), (3,), (2, 3)]), min_size=1, max_size=3)
        ),
        dtype=draw(st.sampled_from(["float32", "float64", "bfloat16"])),
        form=draw(st.sampled_from(["affine", "dot"])),
        # From 1e-30 to 1e30, not a power of two: a scaling that rounds.
        magnitude=0.7
        * 10.0 ** draw(st.one_of(st.sampled_from([-30, 0, 30]), st.floats(-30, 30))),
        start=draw(st.sampled_from(["random", "zero", "denormal"])),
        fault=draw(st.sampled_from([None, None, float("inf"), float("nan")])),
        trigger=draw(st.floats(0.05, 0.95)),
        seed=draw(st.integers(0, 2**16)),
    )


def _problem(case):
    dtype = jnp.dtype(case["dtype"])
    keys = jax.random.split(jax.random.key(case["seed"]), 3 + len(case["shapes"]))
    z0 = {
        f"leaf{i}": jax.random.normal(key, shape, dtype)
        for i, (key, shape) in enumerate(zip(keys[3:], case["shapes"]))
    }
    size = jax.flatten_util.ravel_pytree(z0)[0].size
    m = case["magnitude"]
    start = {
        "random": lambda a: a * m,
        "zero": jnp.zeros_like,
        # Below the smallest normal float: XLA:CPU flushes such values to zero.
        "denormal": lambda a: a * (jnp.finfo(dtype).tiny / 8),
    }[case["start"]]
    z0 = jax.tree.map(start, z0)
    # Contractive: each row's weights sum in magnitude to at most 0.9.
    shape = (size,) if case["form"] == "affine" else (size, size)
    weight = jax.random.uniform(keys[2], shape, jnp.float64, -0.9, 0.9)
    if case["form"] == "dot":
        weight = weight / size
    x = jax.random.normal(keys[1], (size,), dtype)
    cell = _ScaledCell(weight, m, case["fault"], case["trigger"])
    return cell, z0, x


def _loss(z, m):
    return sum(jnp.sum(jnp.sin(leaf / m)) for leaf in jax.tree.leaves(z))


@pytest.mark.slow  # about 90 s: each case compiles; CI runs it after `make test`
@pytest.mark.usefixtures("x64")
@given(case=_cases())
def test_exact_or_reported(case):
    note(repr(case))
    # Every case compiles its own programs and none is reused; without this the
    # executables of a few hundred cases exhaust the process's memory mappings.
    jax.clear_caches()
    cell, z0, x = _problem(case)
    m, steps = case["magnitude"], case["steps"]
    solver = revdeq.Reversible(beta=case["beta"], rtol=0, atol=0)

    def run(cell, x, throw):
        sol = revdeq.solve(cell, z0, x, solver=solver, max_steps=steps, throw=throw)
        return _loss(sol.value, m), sol.result

    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        (_, result), grads = eqx.filter_jit(
            eqx.filter_value_and_grad(lambda c, x: run(c, x, False), has_aux=True)
        )(cell, x)
        jax.block_until_ready(grads)
    event(f"outcome: {revdeq.RESULTS[result][:40] or 'exact'}")
    if result in _FAILURES:
        # Reported by the solve, and raised under throw.
        with pytest.raises(Exception):
            eqx.filter_jit(lambda c, x: run(c, x, True))(cell, x)[0].block_until_ready()
        if result == revdeq.RESULTS.diverged:
            # A diverging iteration's gradient is still exact.
            assert not warned, [str(w.message) for w in warned]
            return
        if any("ReversibleAdjoint" in str(w.message) for w in warned):
            return  # a gradient through a lost state, reported as meaningless
        # Unreported, the gradient must be exact: `f` was non-finite only at the
        # output, where no state took it in. The checks below hold it to that.
        assert result == revdeq.RESULTS.nonfinite_value, revdeq.RESULTS[result]
        event("non-finite only at the output")
    else:
        assert result == revdeq.RESULTS.successful, revdeq.RESULTS[result]

    # Compiled as a training step is (and in a few seconds rather than 20 eagerly).
    drift = eqx.filter_jit(revdeq.reconstruction_error)(
        cell, z0, x, solver=solver, max_steps=steps
    )
    if case["start"] == "denormal":
        # XLA:CPU flushes a denormal input to zero in some fusions and not in
        # others, so `f(z0)` is not reproducible bit for bit: within one rounding,
        # which undoing the first step amplifies by `β / |1 − β|`. The certificate,
        # whose default tolerance is 0, reports it.
        beta = solver.effective_beta
        amplification = max(1.0, beta / abs(1 - beta))
        assert float(drift) <= amplification * float(jnp.finfo(case["dtype"]).eps)
        warned = [w for w in warned if "drifted" not in str(w.message)]
    else:
        assert drift == 0
    assert not warned, [str(w.message) for w in warned]

    # The truth: autodiff of the same iteration as a plain loop, in float64. Near
    # |1 − β| = 1 the iteration is ill-conditioned, and no computation in the cell's
    # dtype gets close: ours must then be within 10× of what the plain loop's
    # error in the cell's dtype (float32 for a float64 cell, scaled by the ratio of
    # their epsilons) says that dtype can reach, times the resolution `ExactState`
    # spends on headroom for its bound `β / (1 − |1 − β|)` (41× at β = 1.95), and
    # up to 2× more, as its exponent is a whole number of bits.
    # A `lax.scan` rather than a Python loop: up to 200 steps, run eagerly, would
    # take most of the test's time.
    def plain_gradient(cell, z0, x):
        def loss(cell, x):
            out = plain_reversible_loop(
                cell, z0, x, solver.effective_beta, steps, scan=True
            )
            return _loss(out, m)

        return jax.tree.map(np.asarray, eqx.filter_grad(loss)(cell, x))

    as64 = jax.tree.map(lambda a: a.astype(jnp.float64), (cell, z0, x))
    truth = plain_gradient(*as64)
    finite = all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(truth))
    # A fault that fires on the float64 path may miss ours by rounding, no more.
    assert finite or case["fault"] is not None
    if finite:
        dtype = jnp.dtype(case["dtype"])
        probe = jnp.float32 if dtype == jnp.float64 else dtype
        as_probe = jax.tree.map(lambda a: a.astype(probe), (cell, z0, x))
        reachable = relative_error(plain_gradient(*as_probe), truth) * (
            float(jnp.finfo(dtype).eps) / float(jnp.finfo(probe).eps)
        )
        beta = solver.effective_beta
        headroom = max(1.0, beta / (1 - abs(1 - beta)))
        tolerance = max(_GRADIENT_RTOL[case["dtype"]], 20 * headroom * reachable)
        assert relative_error(grads, truth) <= tolerance
