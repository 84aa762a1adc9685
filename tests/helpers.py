"""Test problems and independent references for gradients."""

import functools
import json
import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

import revdeq
from revdeq.testing import TanhCell, plain_reversible_loop


def default_float():
    """JAX's default floating dtype: float64 when x64 is enabled, else float32."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def script_environment(
    xla_flags: str = "", env: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment of a fresh Python running a test script: the test's x64 and
    promotion settings, `XLA_FLAGS`, the variables of `env` (settings read only at
    start-up), and `tests/` and the project on the path."""
    tests = os.path.dirname(__file__)
    return {
        **os.environ,
        "JAX_ENABLE_X64": str(default_float() == jnp.float64),
        "JAX_NUMPY_DTYPE_PROMOTION": jax.config.jax_numpy_dtype_promotion,
        "JAX_NUMPY_RANK_PROMOTION": jax.config.jax_numpy_rank_promotion,
        **(env or {}),
        "XLA_FLAGS": xla_flags,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(
            [tests, os.path.dirname(tests), os.environ.get("PYTHONPATH", "")]
        ),
    }


def run_script(script: str, xla_flags: str = "", env: dict[str, str] | None = None):
    """Run `script` in a fresh Python (see `script_environment`) and return the JSON
    it prints on its last line."""
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=script_environment(xla_flags, env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_file(
    path: str | os.PathLike[str], *args: str, timeout: float
) -> subprocess.CompletedProcess:
    """Run the Python file at `path` with `args` in a fresh Python (see
    `script_environment`), as a user runs it; its output is captured."""
    return subprocess.run(
        [sys.executable, str(path), *args],
        env=script_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def finite_difference_jvp(fn, primal, tangent, eps=1e-6):
    """Central difference of `fn` at `primal` along `tangent` (use in float64)."""
    plus = jtu.tree_map(lambda p, t: p + eps * t, primal, tangent)
    minus = jtu.tree_map(lambda p, t: p - eps * t, primal, tangent)
    return jtu.tree_map(lambda a, b: (a - b) / (2 * eps), fn(plus), fn(minus))


class PytreeCell(eqx.Module):
    """A cell on a `{"a": (n,), "b": (2, m)}` state whose leaves interact."""

    wa: jax.Array
    wb: jax.Array

    def __init__(self, n, m, *, key, dtype=jnp.float64):
        k1, k2 = jax.random.split(key)
        size = n + 2 * m
        self.wa = 0.7 * jax.random.normal(k1, (n, size), dtype) / jnp.sqrt(size)
        self.wb = 0.7 * jax.random.normal(k2, (2 * m, size), dtype) / jnp.sqrt(size)

    def __call__(self, z, x):
        flat = jnp.concatenate([z["a"], z["b"].ravel()])
        return {
            "a": jnp.tanh(self.wa @ flat + x["a"]),
            "b": jnp.sin(self.wb @ flat).reshape(z["b"].shape) + x["b"],
        }


def array_problem(key, dtype=jnp.float64, *, dim=6, scale=0.9, start=0.3):
    """A `TanhCell` (weights of `scale`), a random `z0` of scale `start` (zeros at
    0) and an input, of `dim` elements in `dtype`."""
    k1, k2, k3 = jax.random.split(key, 3)
    cell = TanhCell(dim, key=k1, scale=scale, dtype=dtype)
    z0 = start * jax.random.normal(k2, (dim,), dtype)
    return cell, z0, jax.random.normal(k3, (dim,), dtype)


def pytree_problem(key, dtype=jnp.float64):
    """A `PytreeCell` with a random `z0` and an input, in `dtype`."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    cell = PytreeCell(3, 2, key=k1, dtype=dtype)
    z0 = {
        "a": 0.2 * jax.random.normal(k2, (3,), dtype),
        "b": 0.2 * jax.random.normal(k3, (2, 2), dtype),
    }
    x = {"a": jax.random.normal(k4, (3,), dtype), "b": jnp.full((2, 2), 0.1, dtype)}
    return cell, z0, x


def plain_damped_loop(cell, z0, x, damping, steps):
    z = z0
    for _ in range(steps):
        z = jtu.tree_map(lambda a, f: (1 - damping) * a + damping * f, z, cell(z, x))
    return z


def dense_implicit_gradient(cell, z_star, x, cotangent):
    """IFT by a dense solve: `w = (I − Jᵀ)⁻¹ g`, then the VJP of `f` in `(cell, x)`."""
    flat, unravel = jax.flatten_util.ravel_pytree(z_star)
    jac = jax.jacfwd(lambda v: jax.flatten_util.ravel_pytree(cell(unravel(v), x))[0])(
        flat
    )
    g, _ = jax.flatten_util.ravel_pytree(cotangent)
    w = jnp.linalg.solve(jnp.eye(flat.size) - jac.T, g)
    _, vjp = eqx.filter_vjp(lambda c, xx: c(z_star, xx), cell, x)
    return vjp(unravel(w))


def float32_problem(key, dim=32, batch=4):
    """A float32 `TanhCell`, a batch of zero starts and a batch of inputs."""
    k1, k2 = jax.random.split(key)
    cell = TanhCell(dim, key=k1, dtype=jnp.float32)
    xs = jax.random.normal(k2, (batch, dim), jnp.float32)
    return cell, jnp.zeros_like(xs), xs


def batch_grad(single, cell, z0s, xs):
    """The gradient in `cell` of a loss on `single` vmapped over the batch."""

    def loss(cell):
        out = jax.vmap(single, in_axes=(None, 0, 0))(cell, z0s, xs)
        return jnp.sum(jnp.sin(out))

    return eqx.filter_grad(loss)(cell)


def solve_grad(cell, z0s, xs, *, solver, max_steps, adjoint=None):
    """`batch_grad` through `revdeq.solve`'s value, with `adjoint` or the default."""

    def single(c, z0, x):
        return revdeq.solve(
            c, z0, x, solver=solver, adjoint=adjoint, max_steps=max_steps
        ).value

    return batch_grad(single, cell, z0s, xs)


def float64_loop_grad(cell, z0s, xs, *, beta, steps):
    """The independent truth: `batch_grad` of a plain float64 reversible loop."""
    with jax.enable_x64(True):
        as64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (cell, z0s, xs))
        loop = functools.partial(plain_reversible_loop, beta=beta, steps=steps)
        return jax.tree.map(np.asarray, batch_grad(loop, *as64))
