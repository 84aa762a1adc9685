"""Regularisers for equilibrium cells: Jacobian penalty, fixed-point correction and
weight normalisation."""

import functools
import operator
from collections.abc import Callable, Sequence
from typing import TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, PRNGKeyArray, PyTree, Scalar

from .._custom_types import Args, Fn, Y
from .._tree import tree_size, tree_sum_squares


_Module = TypeVar("_Module", bound=PyTree)


def _rademacher_like(tree: PyTree[Array], key: PRNGKeyArray) -> PyTree[Array]:
    leaves, treedef = jtu.tree_flatten(tree)
    keys = jr.split(key, len(leaves))
    signs = [jr.rademacher(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return jtu.tree_unflatten(treedef, signs)


def jacobian_frobenius_penalty(
    fn: Fn, z: Y, args: Args, *, key: PRNGKeyArray, num_samples: int = 1
) -> Scalar:
    r"""Hutchinson estimate of the Jacobian penalty $\lVert \partial f / \partial z
    \rVert_F^2 / d$ of Bai, Koltun & Kolter (2021).

    For Rademacher vectors $v$, $\mathbb{E}\lVert v^\top J \rVert^2 =
    \operatorname{tr}(J J^\top) = \lVert J \rVert_F^2$, so the mean over
    `num_samples` vector-Jacobian products is unbiased. It is differentiable in the
    parameters of `fn`, so adding it to a loss penalises the cell's stiffness at `z`
    (usually the fixed point).

    ??? cite

        ```bibtex
        @inproceedings{bai2021stabilizing,
            title={Stabilizing Equilibrium Models by Jacobian Regularization},
            author={Bai, Shaojie and Koltun, Vladlen and Kolter, J. Zico},
            booktitle={International Conference on Machine Learning},
            year={2021}
        }
        ```

    **Arguments:**

    - `fn`: the cell `fn(z, args) -> z`.
    - `z`: where to take the Jacobian, any pytree of arrays.
    - `args`: the injected input, held fixed.
    - `key`: a PRNG key for the probe vectors.
    - `num_samples`: number of probe vectors averaged.

    **Returns:**

    A scalar estimate of $\lVert J \rVert_F^2 / d$, with $d$ the number of elements of
    `z`.

    !!! Example

        ```python
        import jax
        import jax.numpy as jnp
        import revdeq


        cell = revdeq.nn.MLPCell(dim=16, hidden=32, key=jax.random.key(0))
        deq = revdeq.nn.DEQ(cell, (16,), solver=revdeq.Reversible(),
                            adjoint=revdeq.ReversibleAdjoint(), max_steps=8)
        x = jnp.ones(16)
        z_star, _ = deq(x)
        task_loss = jnp.mean(z_star**2)
        loss = task_loss + 0.1 * revdeq.nn.jacobian_frobenius_penalty(
            deq.cell, z_star, x, key=jax.random.key(1)
        )
        ```
    """
    if num_samples < 1:
        raise ValueError(f"`num_samples` must be >= 1, got {num_samples}.")
    fz, vjp_fn = jax.vjp(lambda z: fn(z, args), z)

    def squared_norm(key):
        (vjp,) = vjp_fn(_rademacher_like(fz, key))
        return tree_sum_squares(vjp)

    samples = jax.vmap(squared_norm)(jr.split(key, num_samples))
    return jnp.mean(samples) / tree_size(z)


def fixed_point_correction_loss(
    loss_fn: Callable[[Y], Scalar], iterates: Sequence[Y], *, gamma: float = 0.8
) -> Scalar:
    r"""Fixed-point correction (Bai et al. 2022): supervise intermediate iterates.

    Given iterates $z_1, \dots, z_K$ of a solve (in order) and a task loss
    $\ell$ that applies the head, returns
    $\sum_{k=1}^{K} \gamma^{K-k}\, \ell(z_k)$,
    so the last iterate has weight one and earlier ones decay geometrically. It
    gives the cell a dense training signal along the solver's path.

    ??? cite

        ```bibtex
        @inproceedings{bai2022deep,
            title={Deep Equilibrium Optical Flow Estimation},
            author={Bai, Shaojie and Geng, Zhengyang and Savani, Yash and
                    Kolter, J. Zico},
            booktitle={IEEE/CVF Conference on Computer Vision and Pattern
                       Recognition},
            year={2022}
        }
        ```

    **Arguments:**

    - `loss_fn`: maps a state to a scalar loss (head plus task loss).
    - `iterates`: the states to supervise, oldest first.
    - `gamma`: decay in (0, 1].

    **Returns:**

    The weighted sum of losses, a scalar.

    !!! Example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import optax
        import revdeq


        cell = revdeq.nn.MLPCell(dim=16, hidden=32, key=jax.random.key(0))
        head = eqx.nn.Linear(16, 10, key=jax.random.key(1))
        x, label = jnp.ones(16), jnp.array(3)
        z_star = revdeq.solve(cell, jnp.zeros(16), x, max_steps=8).value

        z, iterates = z_star, []
        for _ in range(4):  # a few differentiable steps from the fixed point
            z = cell(z, x)
            iterates.append(z)
        loss = revdeq.nn.fixed_point_correction_loss(
            lambda z: optax.softmax_cross_entropy_with_integer_labels(head(z), label),
            iterates[1::2],
        )
        ```
    """
    if not iterates:
        raise ValueError("`iterates` must hold at least one state.")
    if not 0 < gamma <= 1:
        raise ValueError(f"`gamma` must lie in (0, 1], got {gamma}.")
    num = len(iterates)
    weighted = [gamma ** (num - 1 - k) * loss_fn(z) for k, z in enumerate(iterates)]
    return functools.reduce(operator.add, weighted)


def _is_layer(x) -> bool:
    return isinstance(x, (eqx.nn.Linear, eqx.nn.Conv))


def _is_layer_or_normalised(x) -> bool:
    return _is_layer(x) or isinstance(x, eqx.nn.WeightNorm)


def apply_weight_norm(module: _Module) -> _Module:
    r"""Wrap every `eqx.nn.Linear` and `eqx.nn.Conv` in `module` with
    `eqx.nn.WeightNorm`.

    Each weight becomes $g \, v / \lVert v \rVert$ per output unit, initialised to the
    same function. Layers that are already weight-normalised are left alone. Works on
    any cell, including the projections inside `eqx.nn.MultiheadAttention`.

    ??? cite

        ```bibtex
        @inproceedings{salimans2016weight,
            title={Weight Normalization: A Simple Reparameterization to Accelerate
                   Training of Deep Neural Networks},
            author={Salimans, Tim and Kingma, Diederik P.},
            booktitle={Advances in Neural Information Processing Systems},
            year={2016}
        }
        ```

    **Arguments:**

    - `module`: any pytree holding layers, e.g. a [`revdeq.nn.ConvCell`][].

    **Returns:**

    A copy of `module` with its layers wrapped.

    !!! Example

        ```python
        import jax
        import revdeq


        cell = revdeq.nn.ConvCell(16, 32, 4, key=jax.random.key(0))
        cell = revdeq.nn.apply_weight_norm(cell)
        ```

    !!! Note "Spectral normalisation"

        `eqx.nn.SpectralNorm` keeps its power-iteration vectors in an
        `eqx.nn.State` and updates them on every call, so it does not fit a cell
        `f(z, x)`: inside a solve, `f` must be the same function at every evaluation
        (the reversible backward pass evaluates it again). Pass the state through the
        solve's `args` and call the layer with `inference=True`, so that $\sigma$
        comes from the stored vectors; then run one call with `inference=False`
        outside the solve, once per training step, to advance the power iteration
        and keep the returned state.
    """

    def layers(tree):
        leaves = jtu.tree_leaves(tree, is_leaf=_is_layer_or_normalised)
        return [x for x in leaves if _is_layer(x)]

    return eqx.tree_at(layers, module, replace_fn=eqx.nn.WeightNorm)
