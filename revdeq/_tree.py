"""Arithmetic on pytrees of arrays, the vocabulary the solvers share."""

import itertools
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, DTypeLike, Float, PyTree, Scalar


def tree_lerp(t, x: PyTree[Array], y: PyTree[Array]) -> PyTree[Array]:
    """`(1 - t) * x + t * y`, leaf by leaf, in `x`'s dtypes."""
    return jtu.tree_map(lambda xi, yi: ((1 - t) * xi + t * yi).astype(xi.dtype), x, y)


def tree_sub(x: PyTree[Array], y: PyTree[Array]) -> PyTree[Array]:
    return jtu.tree_map(jnp.subtract, x, y)


def tree_scale(a, x: PyTree[Array]) -> PyTree[Array]:
    return jtu.tree_map(lambda xi: (a * xi).astype(xi.dtype), x)


def tree_zeros_for_none(
    cotangent: PyTree[Array | None], like: PyTree[Array]
) -> PyTree[Array]:
    """`cotangent` with each `None` (a symbolic zero) made zeros like `like`."""
    return jtu.tree_map(
        lambda c, x: jnp.zeros_like(x) if c is None else c,
        cotangent,
        like,
        is_leaf=lambda c: c is None,
    )


def tree_dtype(x: PyTree[Array]):
    """The dtype that all leaves of `x` promote to."""
    return jnp.result_type(*jtu.tree_leaves(x))


def tree_sum_squares(x: PyTree[Array]) -> Scalar:
    dtype = tree_dtype(x)
    return sum(
        (jnp.sum(jnp.square(leaf.astype(dtype))) for leaf in jtu.tree_leaves(x)),
        jnp.zeros((), dtype),
    )


def tree_size(x: PyTree[Array]) -> int:
    return sum(leaf.size for leaf in jtu.tree_leaves(x))


def tree_max_abs(
    x: PyTree[Array], *, rowwise: bool = False, dtype: DTypeLike | None = None
) -> Float[Array, "*rows"]:
    """The largest magnitude over every element of every leaf (0 for no elements),
    in `dtype` (by default the leaves' common dtype). With `rowwise`, one per row of
    the leading axis that every leaf shares."""
    dtype = tree_dtype(x) if dtype is None else dtype
    biggest = jnp.zeros((), dtype)
    for leaf in jtu.tree_leaves(x):
        if leaf.size:
            axes = tuple(range(1, leaf.ndim)) if rowwise else None
            magnitude = jnp.max(jnp.abs(leaf), axis=axes).astype(dtype)
            biggest = jnp.maximum(biggest, magnitude)
    return biggest


def tree_rms(x: PyTree[Array]) -> Scalar:
    """Root mean square over every element of every leaf.

    Computed on `x` divided by its largest magnitude, so that the squares of a
    float32 state near 1e30 (or 1e-30) neither overflow nor underflow.
    """
    dtype = tree_dtype(x)
    biggest = tree_max_abs(x)
    scale = jnp.where(biggest > 0, biggest, jnp.ones((), dtype))
    scaled = jtu.tree_map(lambda leaf: leaf.astype(dtype) / scale, x)
    return scale * jnp.sqrt(tree_sum_squares(scaled) / max(tree_size(x), 1))


def relative_residual(fz: PyTree[Array], z: PyTree[Array]) -> Scalar:
    """`‖f(z) − z‖ / ‖f(z)‖`, guarded against a zero `f(z)`."""
    num = tree_rms(tree_sub(fz, z))
    den = tree_rms(fz)
    tiny = jnp.finfo(den.dtype).tiny
    return num / jnp.maximum(den, tiny)


def tree_stop_gradient(x: PyTree):
    """`lax.stop_gradient` on the array leaves of any pytree, such as a Module."""
    return jtu.tree_map(
        lambda leaf: jax.lax.stop_gradient(leaf) if eqx.is_array(leaf) else leaf, x
    )


def ravel_rows(
    tree: PyTree[Array], rowwise: bool
) -> tuple[Float[Array, "rows n"], Callable[[Array], PyTree[Array]]]:
    """Flatten `tree` into a matrix, in the dtype its leaves promote to, and the
    inverse map.

    With `rowwise`, row `i` holds element `i` of every leaf's leading axis (every
    leaf must have the same leading size); otherwise there is one row, holding all.
    """
    leaves, treedef = jtu.tree_flatten(tree)
    dtype = tree_dtype(tree)
    rows = check_rows(tree) if rowwise else 1
    flat = [leaf.astype(dtype).reshape(rows, -1) for leaf in leaves]
    splits = list(itertools.accumulate(x.shape[1] for x in flat))[:-1]

    def unravel(matrix: Array) -> PyTree[Array]:
        parts = jnp.split(matrix, splits, axis=1)
        return jtu.tree_unflatten(
            treedef,
            [p.reshape(x.shape).astype(x.dtype) for p, x in zip(parts, leaves)],
        )

    return jnp.concatenate(flat, axis=1), unravel


def check_rows(tree: PyTree[Array]) -> int:
    """The leading size that every leaf of `tree` shares, or a `ValueError`."""
    sizes: set[int | None] = {
        x.shape[0] if x.ndim else None for x in jtu.tree_leaves(tree)
    }
    size = sizes.pop() if len(sizes) == 1 else None
    if size is None:
        raise ValueError(
            "`rowwise=True` treats the leading axis of every leaf of `z0` as "
            "independent rows (e.g. sequence positions), so every leaf needs the "
            f"same leading size; got shapes {[x.shape for x in jtu.tree_leaves(tree)]}."
            " Give every leaf that axis, or use `rowwise=False`."
        )
    return size
