"""Deep equilibrium models of the RevDEQ paper: an image classifier and a language
model. Each is a trunk (the explicit layers) around equilibrium stages; the
weight-untied baselines in `_baselines.py` share the trunks."""

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, DTypeLike, Float, Int, PRNGKeyArray

from .._adjoint.base import AbstractAdjoint
from .._adjoint.reversible import ReversibleAdjoint
from .._precision.exact_state import ExactState
from .._precision.float_state import FloatState
from .._solver.anderson import Anderson
from .._solver.base import AbstractSolver
from .._solver.broyden import Broyden
from .._solver.fixed_point import FixedPointIteration
from .._solver.reversible import Reversible
from ._cells import ConvCell, DEQTransformerCell, TransformerCell
from ._deq import DEQ


# A stage maps the injected input to `(state, stats)`: a `DEQ` or an `ExplicitStack`.
Stage = Callable[[Array], tuple[Array, Any]]


def num_groups(channels: int, group_size: int) -> int:
    """Group-norm groups of `group_size` channels each."""
    if channels % group_size != 0:
        raise ValueError(
            f"`group_size`={group_size} must divide every entry of `channels`; "
            f"got a stage with {channels} channels."
        )
    return channels // group_size


def stage_shapes(
    image_shape: tuple[int, int, int], channels: Sequence[int]
) -> list[tuple[int, int, int]]:
    """The state shape of each stage; every stage after the first halves H and W."""
    _, height, width = image_shape
    shapes = []
    for c in channels:
        shapes.append((c, height, width))
        height, width = -(-height // 2), -(-width // 2)
    return shapes


def check_stage_lengths(**lengths: Sequence[int]) -> None:
    sizes = {name: len(value) for name, value in lengths.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"Give one entry per stage in each of {sizes}.")


class _Downsample(eqx.Module):
    """A pre-activation residual block that halves the resolution:
    `conv3x3(relu(gn(conv3x3/2(relu(gn(x)))))) + conv1x1/2(x)`."""

    norm1: eqx.nn.GroupNorm
    conv1: eqx.nn.Conv2d
    norm2: eqx.nn.GroupNorm
    conv2: eqx.nn.Conv2d
    shortcut: eqx.nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        group_size: int,
        *,
        key: PRNGKeyArray,
    ) -> None:
        key1, key2, key3 = jr.split(key, 3)
        self.norm1 = eqx.nn.GroupNorm(num_groups(in_channels, group_size), in_channels)
        self.conv1 = eqx.nn.Conv2d(
            in_channels, out_channels, 3, stride=2, padding=1, use_bias=False, key=key1
        )
        self.norm2 = eqx.nn.GroupNorm(
            num_groups(out_channels, group_size), out_channels
        )
        self.conv2 = eqx.nn.Conv2d(
            out_channels, out_channels, 3, padding=1, use_bias=False, key=key2
        )
        self.shortcut = eqx.nn.Conv2d(
            in_channels, out_channels, 1, stride=2, use_bias=False, key=key3
        )

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "c2 h2 w2"]:
        h = self.conv1(jax.nn.relu(self.norm1(x)))
        h = self.conv2(jax.nn.relu(self.norm2(h)))
        return h + self.shortcut(x)


class ResNetTrunk(eqx.Module):
    """The explicit layers of the multiscale classifiers: a conv stem, downsampling
    between stages, global average pooling and a linear head. Each stage adds its
    equilibrium state to its input, `x ← x + z*(x)`."""

    stem: eqx.nn.Conv2d
    stem_norm: eqx.nn.GroupNorm
    downsamples: tuple[_Downsample, ...]
    head: eqx.nn.Linear

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        num_classes: int,
        group_size: int,
        *,
        key: PRNGKeyArray,
    ) -> None:
        stem_key, down_key, head_key = jr.split(key, 3)
        self.stem = eqx.nn.Conv2d(
            in_channels, channels[0], 3, padding=1, use_bias=False, key=stem_key
        )
        self.stem_norm = eqx.nn.GroupNorm(
            num_groups(channels[0], group_size), channels[0]
        )
        down_keys = jr.split(down_key, max(len(channels) - 1, 1))
        self.downsamples = tuple(
            _Downsample(c_in, c_out, group_size, key=k)
            for c_in, c_out, k in zip(channels[:-1], channels[1:], down_keys)
        )
        self.head = eqx.nn.Linear(channels[-1], num_classes, key=head_key)

    def __call__(
        self, image: Float[Array, "c h w"], stages: Sequence[Stage]
    ) -> Float[Array, " num_classes"]:
        x = jax.nn.relu(self.stem_norm(self.stem(image)))
        for i, stage in enumerate(stages):
            if i > 0:
                x = self.downsamples[i - 1](x)
            z, _ = stage(x)
            x = x + z.astype(x.dtype)
        return self.head(jnp.mean(x, axis=(1, 2)))


CIFAR10_TRUNK: dict[str, Any] = dict(
    channels=(128, 256, 256, 128), width_expansions=(1, 3, 3, 1), group_size=16
)
"""The multiscale layout of the paper's CIFAR-10 model (the authors' training script):
keyword arguments of [`revdeq.nn.ImplicitResNet`][]."""


class ImplicitResNet(eqx.Module):
    r"""The multiscale implicit ResNet of RevDEQs, on one `(C, H, W)` image.

    A 3×3 conv stem with group norm and ReLU, then one stage per entry of `channels`:
    stage $i$ solves $z^* = f_i(z^*, x)$ with a [`revdeq.nn.ConvCell`][] of
    `width_expansions[i] * channels[i]` hidden channels and sets $x \leftarrow x +
    z^*$; between stages a strided pre-activation residual block halves the
    resolution. Global average pooling and a linear layer give the logits.

    It follows the authors' public code, with one change: group norm replaces batch
    norm in the stem and the downsampling blocks, so the model is stateless and each
    example is independent of the rest of its batch.

    ??? cite

        ```bibtex
        @article{mccallum2025reversible,
            title={Reversible Deep Equilibrium Models},
            author={McCallum, Sam and Arora, Kamran and Foster, James},
            journal={arXiv preprint arXiv:2509.12917},
            year={2025}
        }
        ```
    !!! Example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import revdeq


        @eqx.filter_jit
        def predict(model, images):
            return jax.vmap(model)(images)


        model = revdeq.nn.ImplicitResNet((1, 8, 8), 10, channels=(8,),
                                         width_expansions=(1,), max_steps=(4,),
                                         group_size=4, key=jax.random.key(0))
        logits = predict(model, jnp.zeros((2, 1, 8, 8)))  # (2, 10)
        ```
    """

    trunk: ResNetTrunk
    stages: tuple[DEQ, ...]

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_classes: int,
        *,
        key: PRNGKeyArray,
        channels: Sequence[int] = (16, 32),
        width_expansions: Sequence[int] = (1, 2),
        max_steps: Sequence[int] = (4, 4),
        group_size: int = 8,
        solver: AbstractSolver = Reversible(beta=0.8, rtol=0.0, atol=0.0),
        adjoint: AbstractAdjoint = ReversibleAdjoint(),
        state_dtype: DTypeLike = jnp.float32,
        compute_dtype: DTypeLike | None = None,
    ) -> None:
        """**Arguments:**

        - `image_shape`: `(channels, height, width)` of an input image.
        - `num_classes`: number of logits.
        - `key`: a PRNG key for the initialisation.
        - `channels`: the width of each stage.
        - `width_expansions`: per stage, the hidden width of its cell as a multiple
            of its channels.
        - `max_steps`: per stage, the solver's step budget.
        - `group_size`: channels per group norm group; must divide every width.
        - `solver`, `adjoint`, `state_dtype`, `compute_dtype`: as in
            [`revdeq.nn.DEQ`][], shared by all stages.
        """
        check_stage_lengths(
            channels=channels, width_expansions=width_expansions, max_steps=max_steps
        )
        trunk_key, *cell_keys = jr.split(key, len(channels) + 1)
        self.trunk = ResNetTrunk(
            image_shape[0], channels, num_classes, group_size, key=trunk_key
        )
        self.stages = tuple(
            DEQ(
                ConvCell(c, w * c, num_groups(c, group_size), key=k),
                shape,
                solver=solver,
                adjoint=adjoint,
                max_steps=steps,
                state_dtype=state_dtype,
                compute_dtype=compute_dtype,
            )
            for c, w, steps, shape, k in zip(
                channels,
                width_expansions,
                max_steps,
                stage_shapes(image_shape, channels),
                cell_keys,
            )
        )

    @classmethod
    def cifar10(cls, *, key: PRNGKeyArray, **kwargs) -> "ImplicitResNet":
        """The paper-scale CIFAR-10 model.

        The configuration of the authors' CIFAR-10 training script: four stages of
        `(128, 256, 256, 128)` channels with width expansions `(1, 3, 3, 1)`, four
        reversible steps per stage at `beta = 0.8`, group norms of 16 channels.
        Keyword arguments override these (e.g. `state_dtype`).
        """
        config: dict[str, Any] = dict(
            **CIFAR10_TRUNK,
            max_steps=(4, 4, 4, 4),
            solver=Reversible(beta=0.8, rtol=0.0, atol=0.0),
        )
        return cls((3, 32, 32), 10, key=key, **(config | kwargs))

    def __call__(self, image: Float[Array, "c h w"]) -> Float[Array, " classes"]:
        """**Arguments:**

        - `image`: one image of `image_shape`.

        **Returns:**

        The logits.
        """
        return self.trunk(image, self.stages)


class LanguageModelTrunk(eqx.Module):
    """The explicit layers of the language models: token plus learned position
    embeddings in, final layer norm and a bias-free linear head out."""

    token_embedding: eqx.nn.Embedding
    position_embedding: eqx.nn.Embedding
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear
    seq_len: int = eqx.field(static=True)

    def __init__(
        self, vocab_size: int, seq_len: int, dim: int, *, key: PRNGKeyArray
    ) -> None:
        tkey, pkey, hkey = jr.split(key, 3)
        self.token_embedding = eqx.nn.Embedding(vocab_size, dim, key=tkey)
        self.position_embedding = eqx.nn.Embedding(seq_len, dim, key=pkey)
        self.norm = eqx.nn.LayerNorm(dim)
        self.head = eqx.nn.Linear(dim, vocab_size, use_bias=False, key=hkey)
        self.seq_len = seq_len

    def embed(self, tokens: Int[Array, " seq_len"]) -> Float[Array, "seq_len dim"]:
        """Token plus position embeddings: the stage's injected input."""
        if tokens.shape != (self.seq_len,):
            raise ValueError(
                f"`tokens` must have shape ({self.seq_len},), got {tokens.shape}."
            )
        return jax.vmap(self.token_embedding)(tokens) + self.position_embedding.weight

    def readout(self, z: Float[Array, "seq_len dim"]) -> Float[Array, "seq_len vocab"]:
        """The next-token logits of a stage's output."""
        z = z.astype(self.position_embedding.weight.dtype)
        return jax.vmap(self.head)(jax.vmap(self.norm)(z))

    def __call__(
        self, tokens: Int[Array, " seq_len"], stage: Stage
    ) -> Float[Array, "seq_len vocab"]:
        z, _ = stage(self.embed(tokens))
        return self.readout(z)


def residual_headroom_bits(precision: ExactState, max_steps: int) -> int:
    """The headroom of `precision` for a residual cell `z + g(z)`, whose state grows
    with the number of steps: one more bit per doubling of `max_steps` past 4."""
    return precision.headroom_bits + max(0, math.ceil(math.log2(max_steps)) - 2)


def causal_solver(solver: AbstractSolver, max_steps: int) -> AbstractSolver:
    """`solver` with the positions of a sequence (the leading axis of the state)
    kept independent, or a `ValueError` for one that cannot be made so.

    An `ExactState` also gets `log2(max_steps / 4)` more bits of headroom
    (`residual_headroom_bits`): the residual Transformer cell's state grows with the
    number of steps.
    """
    if solver.rtol != 0 or solver.atol != 0:
        raise ValueError(
            "The language model's `solver` must have `rtol=0` and `atol=0`: a "
            "convergence test over the whole sequence would let later tokens decide "
            "when earlier positions stop iterating."
        )
    if isinstance(solver, (Anderson, Broyden)):
        return dataclasses.replace(solver, rowwise=True)
    if isinstance(solver, Reversible):
        if isinstance(solver.precision, ExactState):
            precision = dataclasses.replace(
                solver.precision,
                rowwise=True,
                headroom_bits=residual_headroom_bits(solver.precision, max_steps),
            )
            return dataclasses.replace(solver, precision=precision)
        if isinstance(solver.precision, FloatState):
            return solver
    elif isinstance(solver, FixedPointIteration):
        return solver
    raise ValueError(
        f"The language model cannot keep `solver`={solver!r} causal. Use "
        "`revdeq.Reversible` (with `ExactState` or `FloatState`), "
        "`revdeq.FixedPointIteration`, `revdeq.Anderson` or `revdeq.Broyden`, whose "
        "updates it can make position-wise."
    )


class DEQLanguageModel(eqx.Module):
    r"""An exactly causal deep equilibrium Transformer language model.

    Token plus learned position embeddings $x$; the state solves
    $z^* = f(z^*, x)$ for a causal Transformer cell $f$; a final layer norm and a
    bias-free linear head give the next-token logits at every position.

    **Two cells.** The default, the pre-norm [`revdeq.nn.TransformerCell`][] of the
    RevDEQ paper, is residual ($z + g(z)$) and has no fixed point that the forward
    solvers can find: its iterates grow. It suits the reversible solver's fixed
    budget of a few steps. For a DEQ trained with [`revdeq.ImplicitAdjoint`][], whose
    gradient holds only at a fixed point, pass `cell=revdeq.nn.DEQTransformerCell`:
    the post-norm DEQ-Transformer block, on which [`revdeq.Anderson`][],
    [`revdeq.Broyden`][] and [`revdeq.FixedPointIteration`][] converge.

    **Causality is exact:** changing token $j$ leaves the logits at every position
    $< j$ bit-identical. The cell only mixes positions through causal attention, and
    the solver must not mix them either. The model therefore makes the given solver
    position-wise (`rowwise=True`): [`revdeq.Anderson`][] mixes each position's own
    history, [`revdeq.Broyden`][] keeps one quasi-Newton update per position, and
    [`revdeq.ExactState`][] gives each position its own fixed-point exponent.
    [`revdeq.FixedPointIteration`][] and [`revdeq.FloatState`][] act elementwise
    already. The tolerances must be zero (a fixed number of steps): a convergence
    test over the whole sequence would let later tokens decide when earlier positions
    stop. (A solve that fails, e.g. diverges, still stops for the whole sequence.)

    **Exact by default.** The default solver runs `Reversible` steps on an
    `ExactState`, so the gradient is exact for the computed forward pass. The default
    cell is residual (`z + g(z)`), so its state grows with the number of steps: past
    four steps the model gives the `ExactState` one more bit of headroom per doubling
    of `max_steps`, at one bit of resolution each. Against a float64 truth, the float32
    gradient is within about `3e-7` at 4 steps and `1e-5` at 64; a float64 state
    (`state_dtype`, under x64) keeps full resolution.

    ??? cite

        ```bibtex
        @article{mccallum2025reversible,
            title={Reversible Deep Equilibrium Models},
            author={McCallum, Sam and Arora, Kamran and Foster, James},
            journal={arXiv preprint arXiv:2509.12917},
            year={2025}
        }
        ```
    !!! Example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import revdeq


        @eqx.filter_jit
        def predict(model, tokens):
            return jax.vmap(model)(tokens)


        model = revdeq.nn.DEQLanguageModel(256, 8, 16, 2, key=jax.random.key(0))
        tokens = jnp.zeros((2, 8), jnp.int32)  # (batch, seq_len)
        logits = predict(model, tokens)  # (2, 8, 256)

        # A DEQ-Transformer with implicit gradients (tolerances must be zero).
        deq = revdeq.nn.DEQLanguageModel(
            256, 8, 16, 2, key=jax.random.key(0),
            cell=revdeq.nn.DEQTransformerCell,
            solver=revdeq.Anderson(rtol=0, atol=0),
            adjoint=revdeq.ImplicitAdjoint(), max_steps=20,
        )
        logits = predict(deq, tokens)
        ```
    """

    trunk: LanguageModelTrunk
    deq: DEQ

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
        cell: type[TransformerCell] | type[DEQTransformerCell] = TransformerCell,
        solver: AbstractSolver = Reversible(beta=0.5, rtol=0.0, atol=0.0),
        adjoint: AbstractAdjoint = ReversibleAdjoint(),
        max_steps: int = 4,
        state_dtype: DTypeLike = jnp.float32,
        compute_dtype: DTypeLike | None = None,
    ) -> None:
        """**Arguments:**

        - `vocab_size`: number of tokens.
        - `seq_len`: the (fixed) sequence length.
        - `dim`: the model width.
        - `num_heads`: attention heads; must divide `dim`.
        - `key`: a PRNG key for the initialisation.
        - `mlp_ratio`: the cell's MLP width as a multiple of `dim`.
        - `mlp_depth`: the number of hidden layers of the cell's MLP.
        - `cell`: the cell's class, [`revdeq.nn.TransformerCell`][] (pre-norm) or
            [`revdeq.nn.DEQTransformerCell`][] (post-norm, with a fixed point), built
            with the arguments above and its own defaults.
        - `solver`: a solver with zero tolerances, made position-wise (see
            above); by default `Reversible` steps with an `ExactState`.
        - `adjoint`, `max_steps`, `state_dtype`, `compute_dtype`: as in
            [`revdeq.nn.DEQ`][].
        """
        if cell not in (TransformerCell, DEQTransformerCell):
            raise ValueError(
                "`cell` must be `revdeq.nn.TransformerCell` or "
                f"`revdeq.nn.DEQTransformerCell` (the class), got {cell!r}."
            )
        trunk_key, cell_key = jr.split(key)
        self.trunk = LanguageModelTrunk(vocab_size, seq_len, dim, key=trunk_key)
        self.deq = DEQ(
            cell(dim, num_heads, mlp_ratio, key=cell_key, mlp_depth=mlp_depth),
            (seq_len, dim),
            solver=causal_solver(solver, max_steps),
            adjoint=adjoint,
            max_steps=max_steps,
            state_dtype=state_dtype,
            compute_dtype=compute_dtype,
        )

    @classmethod
    def wikitext103(cls, *, key: PRNGKeyArray, **kwargs) -> "DEQLanguageModel":
        """The paper-scale Wikitext-103 model, as in the authors' training script:
        GPT-2 vocabulary padded to 50304, sequences of 448 tokens, width 768, 12
        heads, an MLP of two hidden layers of width 3072, four reversible steps at
        `beta = 0.5`. Keyword arguments override these."""
        config: dict[str, Any] = dict(mlp_ratio=4, mlp_depth=2, max_steps=4)
        return cls(50304, 448, 768, 12, key=key, **(config | kwargs))

    def __call__(self, tokens: Int[Array, " seq_len"]) -> Float[Array, "seq_len vocab"]:
        """**Arguments:**

        - `tokens`: one sequence of `seq_len` token ids.

        **Returns:**

        The next-token logits at every position.
        """
        return self.trunk(tokens, self.deq)
