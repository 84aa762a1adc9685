"""Equilibrium cells `f(z, x) -> z`: one example each; `jax.vmap` goes outside."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._regularise import apply_weight_norm


class MLPCell(eqx.Module):
    r"""A two-layer perceptron cell with input injection.

    $$f(z, x) = \tanh\bigl(W_2 \tanh(W_1 z + U x + b_1) + b_2\bigr).$$

    The outer `tanh` keeps every iterate in $[-1, 1]^{\text{dim}}$ and the map's
    Lipschitz constant at most $\lVert W_2 \rVert \lVert W_1 \rVert$, so small weights
    (or [`revdeq.nn.apply_weight_norm`][]) make it a contraction.

    !!! Example

        ```python
        import jax
        import jax.numpy as jnp
        import revdeq


        cell = revdeq.nn.MLPCell(dim=16, hidden=32, key=jax.random.key(0))
        z_new = cell(jnp.zeros(16), jnp.ones(16))  # z, x: (16,)
        ```
    """

    linear_z: eqx.nn.Linear
    linear_x: eqx.nn.Linear
    linear_out: eqx.nn.Linear
    dim: int = eqx.field(static=True)
    hidden: int = eqx.field(static=True)

    def __init__(self, dim: int, hidden: int, *, key: PRNGKeyArray) -> None:
        """**Arguments:**

        - `dim`: size of the state `z` and of the injected input `x`.
        - `hidden`: width of the hidden layer.
        - `key`: a PRNG key for the initialisation.
        """
        zkey, xkey, okey = jr.split(key, 3)
        self.linear_z = eqx.nn.Linear(dim, hidden, key=zkey)
        self.linear_x = eqx.nn.Linear(dim, hidden, use_bias=False, key=xkey)
        self.linear_out = eqx.nn.Linear(hidden, dim, key=okey)
        self.dim = dim
        self.hidden = hidden

    def __call__(
        self, z: Float[Array, " dim"], x: Float[Array, " dim"]
    ) -> Float[Array, " dim"]:
        """**Arguments:**

        - `z`: the state.
        - `x`: the injected input, already of size `dim`.

        **Returns:**

        The new state, shaped like `z`.
        """
        h = jnp.tanh(self.linear_z(z) + self.linear_x(x))
        return jnp.tanh(self.linear_out(h))


class ConvCell(eqx.Module):
    r"""The implicit residual layer of multiscale (Reversible) DEQs on one image.

    With 3×3 bias-free convolutions $C_1, C_2$ and group norms $N_1, N_2, N_3$:

    $$f(z, x) = N_3\Bigl(\operatorname{relu}\bigl(z + N_2(x
        + C_2\,\operatorname{relu}(N_1(C_1 z)))\bigr)\Bigr),$$

    the form of the authors' public RevDEQ code, itself a variant of MDEQ's residual
    block. The final normalisation bounds the iterates.

    ??? cite

        ```bibtex
        @article{mccallum2025reversible,
            title={Reversible Deep Equilibrium Models},
            author={McCallum, Sam and Arora, Kamran and Foster, James},
            journal={arXiv preprint arXiv:2509.12917},
            year={2025}
        }
        @inproceedings{bai2020multiscale,
            title={Multiscale Deep Equilibrium Models},
            author={Bai, Shaojie and Koltun, Vladlen and Kolter, J. Zico},
            booktitle={Advances in Neural Information Processing Systems},
            year={2020}
        }
        ```

    !!! Example

        ```python
        import jax
        import jax.numpy as jnp
        import revdeq


        cell = revdeq.nn.ConvCell(channels=16, hidden_channels=32, groups=4,
                                  key=jax.random.key(0))
        z_new = cell(jnp.zeros((16, 8, 8)), jnp.ones((16, 8, 8)))  # z, x: (16, 8, 8)
        ```
    """

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    norm1: eqx.nn.GroupNorm
    norm2: eqx.nn.GroupNorm
    norm3: eqx.nn.GroupNorm
    channels: int = eqx.field(static=True)
    hidden_channels: int = eqx.field(static=True)
    groups: int = eqx.field(static=True)

    def __init__(
        self, channels: int, hidden_channels: int, groups: int, *, key: PRNGKeyArray
    ) -> None:
        """**Arguments:**

        - `channels`: channels of the state `z` and of the injected input `x`.
        - `hidden_channels`: channels between the two convolutions.
        - `groups`: number of groups of every group norm; must divide `channels`
            and `hidden_channels`.
        - `key`: a PRNG key for the initialisation.
        """
        for name, value in (
            ("channels", channels),
            ("hidden_channels", hidden_channels),
        ):
            if value % groups != 0:
                raise ValueError(
                    f"`groups`={groups} must divide `{name}`={value} for group norm."
                )
        key1, key2 = jr.split(key)
        conv = functools.partial(
            eqx.nn.Conv2d, kernel_size=3, padding=1, use_bias=False
        )
        self.conv1 = conv(channels, hidden_channels, key=key1)
        self.conv2 = conv(hidden_channels, channels, key=key2)
        self.norm1 = eqx.nn.GroupNorm(groups, hidden_channels)
        self.norm2 = eqx.nn.GroupNorm(groups, channels)
        self.norm3 = eqx.nn.GroupNorm(groups, channels)
        self.channels = channels
        self.hidden_channels = hidden_channels
        self.groups = groups

    def __call__(
        self,
        z: Float[Array, "channels height width"],
        x: Float[Array, "channels height width"],
    ) -> Float[Array, "channels height width"]:
        """**Arguments:**

        - `z`: the state.
        - `x`: the injected input, shaped like `z`.

        **Returns:**

        The new state, shaped like `z`.
        """
        h = jax.nn.relu(self.norm1(self.conv1(z)))
        return self.norm3(jax.nn.relu(z + self.norm2(x + self.conv2(h))))


def _attention_and_mlp(
    dim: int, num_heads: int, mlp_ratio: int, mlp_depth: int, *, key: PRNGKeyArray
) -> tuple[eqx.nn.MultiheadAttention, eqx.nn.MLP]:
    """The self-attention and the position-wise GELU MLP of a Transformer block."""
    if dim % num_heads != 0:
        raise ValueError(f"`num_heads`={num_heads} must divide `dim`={dim}.")
    akey, mkey = jr.split(key)
    attention = eqx.nn.MultiheadAttention(num_heads, dim, key=akey)
    mlp = eqx.nn.MLP(
        dim, dim, mlp_ratio * dim, mlp_depth, activation=jax.nn.gelu, key=mkey
    )
    return attention, mlp


def _causal_self_attention(
    attention: eqx.nn.MultiheadAttention, h: Float[Array, "seq_len dim"]
) -> Float[Array, "seq_len dim"]:
    """Self-attention in which position `i` attends to positions `<= i` only. Masked
    weights are exactly zero, so output `i` depends on `h[:i + 1]` alone, bit for
    bit."""
    seq_len = h.shape[0]
    causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))
    return attention(h, h, h, mask=causal)


class TransformerCell(eqx.Module):
    r"""A pre-LayerNorm causal Transformer block with input injection.

    On a state $z$ of shape `(seq_len, dim)` with injected embeddings $x$:

    $$u = z + \operatorname{Attn}\bigl(\operatorname{LN}_1(z + x)\bigr), \qquad
      f(z, x) = u + \operatorname{MLP}\bigl(\operatorname{LN}_2(u)\bigr),$$

    as in the authors' RevDEQ language model. The attention is causal: position $i$
    attends to positions $\le i$ only, and everything else acts on each position
    separately, so output $i$ depends on $z_{\le i}$ and $x_{\le i}$ alone. Masked
    attention weights are exactly zero, so this holds bit for bit.

    ??? cite

        ```bibtex
        @article{mccallum2025reversible,
            title={Reversible Deep Equilibrium Models},
            author={McCallum, Sam and Arora, Kamran and Foster, James},
            journal={arXiv preprint arXiv:2509.12917},
            year={2025}
        }
        @inproceedings{bai2019deep,
            title={Deep Equilibrium Models},
            author={Bai, Shaojie and Kolter, J. Zico and Koltun, Vladlen},
            booktitle={Advances in Neural Information Processing Systems},
            year={2019}
        }
        ```

    !!! Example

        ```python
        import jax
        import jax.numpy as jnp
        import revdeq


        cell = revdeq.nn.TransformerCell(dim=32, num_heads=4, mlp_ratio=4,
                                         key=jax.random.key(0))
        embeddings = jnp.ones((10, 32))  # (seq_len, dim)
        z_new = cell(jnp.zeros((10, 32)), embeddings)
        ```
    """

    norm1: eqx.nn.LayerNorm
    attention: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP
    dim: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    mlp_ratio: int = eqx.field(static=True)
    mlp_depth: int = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: int,
        *,
        key: PRNGKeyArray,
        mlp_depth: int = 1,
    ) -> None:
        """**Arguments:**

        - `dim`: the model width, the size of each position's state.
        - `num_heads`: number of attention heads; must divide `dim`.
        - `mlp_ratio`: hidden width of the MLP as a multiple of `dim`.
        - `key`: a PRNG key for the initialisation.
        - `mlp_depth`: number of hidden layers of the MLP (the paper uses 2).
        """
        self.norm1 = eqx.nn.LayerNorm(dim)
        self.attention, self.mlp = _attention_and_mlp(
            dim, num_heads, mlp_ratio, mlp_depth, key=key
        )
        self.norm2 = eqx.nn.LayerNorm(dim)
        self.dim = dim
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.mlp_depth = mlp_depth

    def __call__(
        self, z: Float[Array, "seq_len dim"], x: Float[Array, "seq_len dim"]
    ) -> Float[Array, "seq_len dim"]:
        """**Arguments:**

        - `z`: the state, one row per position.
        - `x`: the injected input (token plus position embeddings), shaped like `z`.

        **Returns:**

        The new state, shaped like `z`.
        """
        u = z + _causal_self_attention(self.attention, jax.vmap(self.norm1)(z + x))
        return u + jax.vmap(self.mlp)(jax.vmap(self.norm2)(u))


class DEQTransformerCell(eqx.Module):
    r"""The causal post-LayerNorm Transformer block of the DEQ-Transformer, with the
    input injected at every evaluation.

    On a state $z$ of shape `(seq_len, dim)` with injected embeddings $x$:

    $$h = \operatorname{LN}_1\bigl(z + x + \operatorname{Attn}(z + x)\bigr), \qquad
      f(z, x) = \operatorname{LN}_2\bigl(h + \operatorname{MLP}(h)\bigr).$$

    Unlike the pre-norm [`revdeq.nn.TransformerCell`][] $z + g(z)$, whose iterates
    keep growing, this cell normalises *after* each residual, so every iterate is a
    layer-normalised state, and the injection $x$ inside the first normalisation
    damps its dependence on $z$. At initialisation, fixed-point iteration about
    halves the residual at each step (measured at widths 32 to 64), and
    [`revdeq.Anderson`][], [`revdeq.Broyden`][] and [`revdeq.FixedPointIteration`][]
    reach its fixed point to float32 precision within 30 steps. By default every
    linear layer is weight-normalised ([`revdeq.nn.apply_weight_norm`][]), as in the
    DEQ-Transformer.

    It simplifies Bai et al.'s block: learned absolute positions (in `x`) replace
    relative positional attention, and the injection is added to the attention's
    input rather than to its query, key and value projections.

    The attention is causal and everything else acts on each position separately, so
    output $i$ depends on $z_{\le i}$ and $x_{\le i}$ alone, bit for bit.

    ??? cite

        ```bibtex
        @inproceedings{bai2019deep,
            title={Deep Equilibrium Models},
            author={Bai, Shaojie and Kolter, J. Zico and Koltun, Vladlen},
            booktitle={Advances in Neural Information Processing Systems},
            year={2019}
        }
        ```

    !!! Example

        ```python
        import jax
        import jax.numpy as jnp
        import revdeq


        cell = revdeq.nn.DEQTransformerCell(dim=32, num_heads=4, mlp_ratio=4,
                                            key=jax.random.key(0))
        embeddings = jax.random.normal(jax.random.key(1), (10, 32))  # (seq_len, dim)
        sol = revdeq.solve(cell, jnp.zeros((10, 32)), embeddings,
                           solver=revdeq.Anderson(), max_steps=30)
        z_star = sol.value  # sol.stats["residual"] is below 1e-4
        ```
    """

    attention: eqx.nn.MultiheadAttention
    norm1: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP
    norm2: eqx.nn.LayerNorm
    dim: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    mlp_ratio: int = eqx.field(static=True)
    mlp_depth: int = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: int,
        *,
        key: PRNGKeyArray,
        mlp_depth: int = 1,
        weight_norm: bool = True,
    ) -> None:
        """**Arguments:**

        - `dim`: the model width, the size of each position's state.
        - `num_heads`: number of attention heads; must divide `dim`.
        - `mlp_ratio`: hidden width of the MLP as a multiple of `dim`.
        - `key`: a PRNG key for the initialisation.
        - `mlp_depth`: number of hidden layers of the MLP.
        - `weight_norm`: whether to weight-normalise the attention's projections and
            the MLP's layers.
        """
        attention, mlp = _attention_and_mlp(
            dim, num_heads, mlp_ratio, mlp_depth, key=key
        )
        if weight_norm:
            attention, mlp = apply_weight_norm((attention, mlp))
        self.attention = attention
        self.norm1 = eqx.nn.LayerNorm(dim)
        self.mlp = mlp
        self.norm2 = eqx.nn.LayerNorm(dim)
        self.dim = dim
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.mlp_depth = mlp_depth

    def __call__(
        self, z: Float[Array, "seq_len dim"], x: Float[Array, "seq_len dim"]
    ) -> Float[Array, "seq_len dim"]:
        """**Arguments:**

        - `z`: the state, one row per position.
        - `x`: the injected input (token plus position embeddings), shaped like `z`.

        **Returns:**

        The new state, shaped like `z`.
        """
        u = z + x
        h = jax.vmap(self.norm1)(u + _causal_self_attention(self.attention, u))
        return jax.vmap(self.norm2)(h + jax.vmap(self.mlp)(h))
