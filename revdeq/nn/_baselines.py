"""Explicit, weight-untied baselines: a stack of distinct cells in place of each
equilibrium layer, with the same trunks as the implicit models."""

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ._cells import ConvCell, TransformerCell
from ._models import (
    LanguageModelTrunk,
    ResNetTrunk,
    check_stage_lengths,
    num_groups,
)


class ExplicitStack(eqx.Module):
    r"""`num_layers` distinct cells applied in turn: $z_{i+1} = f_i(z_i, x)$ from
    $z_0 = 0$.

    The explicit, weight-untied counterpart of [`revdeq.nn.DEQ`][], with the same call
    signature. A DEQ whose solve evaluates its cell `n` times costs the same forward
    compute as a stack of `n` layers. The cells are stored stacked along a leading
    axis and applied with `lax.scan`, so compilation time does not grow with depth.

    !!! Example

        ```python
        import jax
        import jax.numpy as jnp
        import revdeq


        stack = revdeq.nn.ExplicitStack(
            lambda k: revdeq.nn.MLPCell(16, 32, key=k), num_layers=8,
            key=jax.random.key(0),
        )
        z, stats = stack(jnp.ones(16))  # x: (16,)
        ```
    """

    cells: PyTree
    num_layers: int = eqx.field(static=True)

    def __init__(
        self,
        make_cell: Callable[[PRNGKeyArray], eqx.Module],
        num_layers: int,
        *,
        key: PRNGKeyArray,
    ) -> None:
        """**Arguments:**

        - `make_cell`: builds one cell from a PRNG key, e.g.
            `lambda k: ConvCell(64, 64, 4, key=k)`. Its state must have the shape
            of its input `x`. Apply weight normalisation inside `make_cell`.
        - `num_layers`: the number of distinct cells.
        - `key`: a PRNG key for the initialisation.
        """
        if num_layers < 1:
            raise ValueError(f"`num_layers` must be >= 1, got {num_layers}.")
        self.cells = eqx.filter_vmap(make_cell)(jr.split(key, num_layers))
        self.num_layers = num_layers

    def __call__(
        self, x: Float[Array, "..."], z0: Float[Array, "..."] | None = None
    ) -> tuple[Float[Array, "..."], dict[str, Any]]:
        """**Arguments:**

        - `x`: the injected input of one example.
        - `z0`: the initial state; zeros shaped like `x` by default.

        **Returns:**

        A pair `(z, stats)`: the last state, and `{"num_fn_evals": num_layers}`.
        """
        params, static = eqx.partition(self.cells, eqx.is_array)

        def layer(z, cell_params):
            return eqx.combine(cell_params, static)(z, x), None

        z0 = jnp.zeros_like(x) if z0 is None else z0
        z, _ = lax.scan(layer, z0, params)
        return z, {"num_fn_evals": jnp.array(self.num_layers)}


class ExplicitResNet(eqx.Module):
    """The explicit counterpart of [`revdeq.nn.ImplicitResNet`][]: the same trunk,
    with each equilibrium stage replaced by an [`revdeq.nn.ExplicitStack`][] of
    distinct [`revdeq.nn.ConvCell`][]s.

    !!! Example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import revdeq


        @eqx.filter_jit
        def predict(model, images):
            return jax.vmap(model)(images)


        model = revdeq.nn.ExplicitResNet((1, 8, 8), 10, channels=(8,),
                                         width_expansions=(1,), num_layers=(4,),
                                         group_size=4, key=jax.random.key(0))
        logits = predict(model, jnp.zeros((2, 1, 8, 8)))  # (2, 10)
        ```
    """

    trunk: ResNetTrunk
    stages: tuple[ExplicitStack, ...]

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_classes: int,
        *,
        key: PRNGKeyArray,
        channels: Sequence[int] = (16, 32),
        width_expansions: Sequence[int] = (1, 2),
        num_layers: Sequence[int] = (8, 8),
        group_size: int = 8,
    ) -> None:
        """**Arguments:**

        - `image_shape`, `num_classes`, `key`, `channels`, `width_expansions`,
            `group_size`: as in [`revdeq.nn.ImplicitResNet`][].
        - `num_layers`: per stage, the number of distinct cells. Match a DEQ's
            `num_fn_evals` for equal forward compute.
        """
        check_stage_lengths(
            channels=channels, width_expansions=width_expansions, num_layers=num_layers
        )
        trunk_key, *stage_keys = jr.split(key, len(channels) + 1)
        self.trunk = ResNetTrunk(
            image_shape[0], channels, num_classes, group_size, key=trunk_key
        )

        def conv_cell(c, w):
            groups = num_groups(c, group_size)
            return lambda k: ConvCell(c, w * c, groups, key=k)

        self.stages = tuple(
            ExplicitStack(conv_cell(c, w), n, key=k)
            for c, w, n, k in zip(channels, width_expansions, num_layers, stage_keys)
        )

    def __call__(self, image: Float[Array, "c h w"]) -> Float[Array, " classes"]:
        """**Arguments:**

        - `image`: one image of `image_shape`.

        **Returns:**

        The logits.
        """
        return self.trunk(image, self.stages)


class ExplicitLanguageModel(eqx.Module):
    """The explicit counterpart of [`revdeq.nn.DEQLanguageModel`][]: the same trunk
    around an [`revdeq.nn.ExplicitStack`][] of `num_layers` distinct
    [`revdeq.nn.TransformerCell`][]s, each receiving the embeddings as input
    injection. Exactly causal.

    !!! Example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import revdeq


        @eqx.filter_jit
        def predict(model, tokens):
            return jax.vmap(model)(tokens)


        model = revdeq.nn.ExplicitLanguageModel(256, 8, 16, 2, key=jax.random.key(0))
        tokens = jnp.zeros((2, 8), jnp.int32)  # (batch, seq_len)
        logits = predict(model, tokens)  # (2, 8, 256)
        ```
    """

    trunk: LanguageModelTrunk
    stack: ExplicitStack

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        dim: int,
        num_heads: int,
        *,
        key: PRNGKeyArray,
        mlp_ratio: int = 4,
        mlp_depth: int = 1,
        num_layers: int = 8,
    ) -> None:
        """**Arguments:**

        - `vocab_size`, `seq_len`, `dim`, `num_heads`, `key`, `mlp_ratio`,
            `mlp_depth`: as in [`revdeq.nn.DEQLanguageModel`][].
        - `num_layers`: the number of distinct Transformer cells.
        """
        trunk_key, stack_key = jr.split(key)
        self.trunk = LanguageModelTrunk(vocab_size, seq_len, dim, key=trunk_key)
        self.stack = ExplicitStack(
            lambda k: TransformerCell(
                dim, num_heads, mlp_ratio, key=k, mlp_depth=mlp_depth
            ),
            num_layers,
            key=stack_key,
        )

    def __call__(self, tokens: Int[Array, " seq_len"]) -> Float[Array, "seq_len vocab"]:
        """**Arguments:**

        - `tokens`: one sequence of `seq_len` token ids.

        **Returns:**

        The next-token logits at every position.
        """
        return self.trunk(tokens, self.stack)
