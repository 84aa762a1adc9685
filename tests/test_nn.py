import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from jaxtyping import TypeCheckError

import revdeq
import revdeq.nn as nn
from revdeq.testing import relative_error

from .helpers import dense_implicit_gradient


def _cells_and_inputs(key):
    ckey, zkey, xkey = jr.split(key, 3)
    cases = [
        (nn.MLPCell(4, 8, key=ckey), (4,)),
        (nn.ConvCell(4, 8, 2, key=ckey), (4, 5, 5)),
        (nn.TransformerCell(8, 2, 2, key=ckey), (6, 8)),
        (nn.DEQTransformerCell(8, 2, 2, key=ckey), (6, 8)),
    ]
    return [
        (cell, jr.normal(zkey, (3, *shape)), jr.normal(xkey, (3, *shape)))
        for cell, shape in cases
    ]


@pytest.mark.slow  # a smoke test; test_guard_bits.py runs every cell batched
def test_cells_jit_vmap(getkey):
    for cell, z, x in _cells_and_inputs(getkey()):
        out = jax.jit(jax.vmap(cell))(z, x)
        assert out.shape == z.shape and out.dtype == jnp.float32
        assert jnp.all(jnp.isfinite(out))


def test_bad_hyperparameters(getkey):
    for cell in (nn.TransformerCell, nn.DEQTransformerCell):
        with pytest.raises(ValueError, match="num_heads"):
            cell(10, 3, 2, key=getkey())
    with pytest.raises(ValueError, match="hidden_channels"):
        nn.ConvCell(4, 6, 4, key=getkey())
    with pytest.raises(ValueError, match="group_size"):
        nn.ImplicitResNet(
            (3, 8, 8),
            10,
            channels=(12,),
            width_expansions=(1,),
            max_steps=(1,),
            group_size=8,
            key=getkey(),
        )
    with pytest.raises(ValueError, match="channels"):
        nn.ImplicitResNet(
            (3, 8, 8),
            10,
            channels=(8, 8),
            width_expansions=(1,),
            max_steps=(1, 1),
            key=getkey(),
        )
    cell = nn.MLPCell(4, 8, key=getkey())
    solver, adjoint = revdeq.FixedPointIteration(), revdeq.UnrolledAdjoint()
    deq = nn.DEQ(cell, (4,), solver=solver, adjoint=adjoint, max_steps=2)
    with pytest.raises(ValueError, match="z0"):
        deq(jnp.zeros(4), z0=jnp.zeros(5))
    with pytest.raises(ValueError, match="tokens"):
        nn.DEQLanguageModel(11, 6, 8, 2, key=getkey())(jnp.zeros(5, int))
    # Refused by our check, or first by the runtime type checker of the tests.
    with pytest.raises((ValueError, TypeCheckError), match="cell"):
        nn.DEQLanguageModel(11, 6, 8, 2, key=getkey(), cell=nn.MLPCell)  # pyright: ignore
    for bad in (
        revdeq.Anderson(),
        revdeq.Broyden(atol=0.0),
        revdeq.Reversible(beta=0.5, precision=revdeq.FloatState()),
    ):
        with pytest.raises(ValueError, match="`solver`.*`rtol=0` and `atol=0`"):
            nn.DEQLanguageModel(11, 6, 8, 2, key=getkey(), solver=bad)


_TRANSFORMER_CELLS = [nn.TransformerCell, nn.DEQTransformerCell]


@pytest.mark.parametrize("cell_cls", _TRANSFORMER_CELLS)
def test_transformer_cell_causal(cell_cls, getkey):
    cell = cell_cls(8, 2, 2, key=getkey())
    z, x, dz, dx = jr.normal(getkey(), (4, 7, 8))
    j = 4
    out = eqx.filter_jit(cell)(z, x)
    changed = eqx.filter_jit(cell)(z.at[j].add(dz[j]), x.at[j].add(dx[j]))
    assert jnp.array_equal(out[:j], changed[:j])
    assert not jnp.any(jnp.all(out[j:] == changed[j:], axis=-1))


def _changes_only_later_logits(model, tokens, vocab):
    """Whether changing token j leaves every logit before j bit-identical and changes
    the logits at j, for every j."""
    logits = eqx.filter_jit(model)(tokens)
    for j in range(1, len(tokens)):
        changed = eqx.filter_jit(model)(tokens.at[j].set((tokens[j] + 1) % vocab))
        if not jnp.array_equal(logits[:j], changed[:j]):
            return False
        assert not jnp.array_equal(logits[j], changed[j])
    return True


_FIXED = dict(rtol=0.0, atol=0.0)
_CAUSAL_PAIRS = {
    "reversible-exact": (
        revdeq.Reversible(beta=0.5, **_FIXED),
        revdeq.ReversibleAdjoint(),
    ),
    "reversible-float": (
        revdeq.Reversible(beta=0.5, precision=revdeq.FloatState(), **_FIXED),
        revdeq.ReversibleAdjoint(),
    ),
    **{
        f"{solver.__name__}-{adjoint.__name__}": (solver(**_FIXED), adjoint())
        for solver in (revdeq.FixedPointIteration, revdeq.Anderson, revdeq.Broyden)
        for adjoint in (revdeq.ImplicitAdjoint, revdeq.PhantomAdjoint)
    },
}


@pytest.mark.parametrize("cell_cls", _TRANSFORMER_CELLS)
@pytest.mark.parametrize("pair", list(_CAUSAL_PAIRS))
def test_language_model_causal(pair, cell_cls, getkey):
    vocab, seq_len = 13, 7
    solver, adjoint = _CAUSAL_PAIRS[pair]
    model = nn.DEQLanguageModel(
        vocab,
        seq_len,
        8,
        2,
        mlp_ratio=2,
        cell=cell_cls,
        solver=solver,
        adjoint=adjoint,
        max_steps=6,
        key=getkey(),
    )
    tokens = jr.randint(getkey(), (seq_len,), 0, vocab)
    logits = eqx.filter_jit(model)(tokens)
    assert logits.shape == (seq_len, vocab) and logits.dtype == jnp.float32
    assert _changes_only_later_logits(model, tokens, vocab)


_FORWARD_SOLVERS = [revdeq.Anderson, revdeq.Broyden, revdeq.FixedPointIteration]


def _relative_residual(cell, z, x):
    return jnp.linalg.norm(cell(z, x) - z) / jnp.linalg.norm(z)


@pytest.mark.parametrize("solver_cls", _FORWARD_SOLVERS)
def test_deq_transformer_cell_has_a_fixed_point(solver_cls, getkey):
    """At their default tolerances, the forward solvers converge on a freshly
    initialised cell (on `TransformerCell` they reach none: its iterates grow)."""
    cell = nn.DEQTransformerCell(16, 4, 4, key=getkey())
    x = jr.normal(getkey(), (8, 16))
    solve = eqx.filter_jit(
        lambda cell, x: revdeq.solve(
            cell, jnp.zeros((8, 16)), x, solver=solver_cls(), max_steps=30
        )
    )
    sol = solve(cell, x)
    assert sol.result == revdeq.RESULTS.successful  # converged before 30 steps
    assert _relative_residual(cell, sol.value, x) < 1e-4


@pytest.mark.slow  # compile-heavy: about 20 s on 2 cores
def test_deq_transformer_cell_implicit_gradient_matches_dense_solve(x64, getkey):
    """`ImplicitAdjoint()` at its defaults, in float64, against the implicit function
    theorem solved densely at the fixed point (`jax.jacfwd` and `jnp.linalg.solve`)."""
    cell = nn.DEQTransformerCell(8, 2, 2, key=getkey())
    cell = jax.tree.map(
        lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, cell
    )
    x, cotangent = jr.normal(getkey(), (2, 4, 8), jnp.float64)
    solver = revdeq.FixedPointIteration(rtol=1e-12, atol=1e-12)

    def solve(cell, x):
        adjoint = revdeq.ImplicitAdjoint()
        sol = revdeq.solve(
            cell, jnp.zeros_like(x), x, solver=solver, adjoint=adjoint, max_steps=100
        )
        return sol.value

    @eqx.filter_jit
    def grads_and_truth(cell, x):
        z_star, vjp = eqx.filter_vjp(solve, cell, x)
        truth = dense_implicit_gradient(cell, z_star, x, cotangent)
        return vjp(cotangent), truth, _relative_residual(cell, z_star, x)

    grads, truth, residual = grads_and_truth(cell, x)
    assert residual < 1e-10  # the dense truth holds at an exact fixed point
    assert relative_error(grads, truth) < 1e-8


@pytest.mark.slow
@pytest.mark.standard_promotion  # optax's Adam
@pytest.mark.parametrize("solver_cls", _FORWARD_SOLVERS)
def test_deq_transformer_language_model_keeps_its_fixed_point(solver_cls):
    """A DEQ with `ImplicitAdjoint()` at its defaults trains on real bytes without a
    failed backward solve, and its cell still has a fixed point afterwards, which
    fixed-point iteration reaches. (The model's own Anderson or Broyden solve can
    stall on a few positions of a trained cell, so it is not the yardstick.)"""
    seq_len, batch_size, num_steps = 16, 8, 20
    model = nn.DEQLanguageModel(
        256,
        seq_len,
        16,
        2,
        key=jr.key(0),
        cell=nn.DEQTransformerCell,
        solver=solver_cls(rtol=0, atol=0),
        adjoint=revdeq.ImplicitAdjoint(),
        max_steps=15,
    )
    corpus = revdeq.data.load_text_corpus(max_bytes=50_000)["train"]
    batches = revdeq.data.sequence_batches(corpus, seq_len, batch_size, key=jr.key(1))

    def loss_fn(model, batch, key):
        inputs, targets = batch
        logits = jax.vmap(model)(inputs)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return loss.mean(), {}

    optimiser = optax.adam(3e-3)
    opt_state = revdeq.train.init_optimiser(optimiser, model)
    step = revdeq.train.make_step(loss_fn, optimiser)
    losses = []
    for _, batch in zip(range(num_steps), batches):
        model, opt_state, metrics = step(model, opt_state, batch, jr.key(2))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 1.0

    @eqx.filter_jit
    def residuals(cell, xs):
        def one(x):
            z0 = jnp.zeros_like(x)
            solver = revdeq.FixedPointIteration()
            sol = revdeq.solve(cell, z0, x, solver=solver, max_steps=50, throw=False)
            return _relative_residual(cell, sol.value, x)

        return jax.vmap(one)(xs)

    xs = jax.vmap(model.trunk.embed)(next(batches)[0])
    assert jnp.max(residuals(model.deq.cell, xs)) < 1e-4


@pytest.mark.slow
def test_explicit_language_model_causal(getkey):
    model = nn.ExplicitLanguageModel(13, 7, 8, 2, mlp_ratio=2, key=getkey())
    assert _changes_only_later_logits(model, jr.randint(getkey(), (7,), 0, 13), 13)


@pytest.mark.parametrize(
    "solver, adjoint",
    [
        (revdeq.Anderson(**_FIXED), revdeq.ImplicitAdjoint()),
        (revdeq.Broyden(**_FIXED), revdeq.ImplicitAdjoint()),
    ],
    ids=["anderson", "broyden"],
)
def test_joint_solvers_would_leak(solver, adjoint, getkey):
    """The causality check can fail: Anderson and Broyden over the whole sequence,
    put back into the model unchanged, let later tokens into earlier logits. (For
    `ExactState`'s shared exponent, see `test_precision.py`.)"""
    vocab, seq_len = 13, 7
    model = nn.DEQLanguageModel(
        vocab, seq_len, 8, 2, mlp_ratio=2, adjoint=adjoint, max_steps=6, key=getkey()
    )
    model = eqx.tree_at(lambda m: m.deq.solver, model, solver)
    tokens = jr.randint(getkey(), (seq_len,), 0, vocab)
    assert not _changes_only_later_logits(model, tokens, vocab)


@pytest.mark.slow  # a smoke test; the models' gradients are tested below
def test_models_jit_vmap(getkey):
    images = jr.normal(getkey(), (2, 3, 8, 8))
    small = dict(channels=(4, 8), width_expansions=(1, 2), group_size=4)
    for model in (
        nn.ImplicitResNet((3, 8, 8), 5, max_steps=(2, 2), **small, key=getkey()),
        nn.ExplicitResNet((3, 8, 8), 5, num_layers=(2, 3), **small, key=getkey()),
    ):
        logits = eqx.filter_jit(eqx.filter_vmap(model))(images)
        assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    tokens = jr.randint(getkey(), (2, 6), 0, 11)
    model = nn.DEQLanguageModel(11, 6, 8, 2, compute_dtype=jnp.bfloat16, key=getkey())
    logits = eqx.filter_jit(eqx.filter_vmap(model))(tokens)
    assert logits.shape == (2, 6, 11) and logits.dtype == jnp.float32


def test_deq_mixed_precision_and_learned_z0(getkey):
    cell = nn.MLPCell(4, 8, key=getkey())
    xs = jr.normal(getkey(), (3, 4))
    deq = nn.DEQ(
        cell,
        (4,),
        solver=revdeq.Reversible(beta=0.8, rtol=0.0, atol=0.0),
        adjoint=revdeq.ReversibleAdjoint(),
        max_steps=3,
        z0="learned",
        compute_dtype=jnp.bfloat16,
    )
    z, stats = eqx.filter_jit(jax.vmap(deq))(xs)
    assert z.shape == (3, 4) and z.dtype == jnp.float32
    assert stats["num_steps"].shape == (3,)
    reference = deq.cell(deq.cell(jnp.zeros(4), xs[0]), xs[0])
    assert 0 < jnp.max(jnp.abs(z[0] - reference))  # the solve did iterate
    assert jnp.allclose(z[0], jax.vmap(deq)(xs)[0][0])

    def loss(deq):
        return jnp.sum(jax.vmap(deq)(xs)[0] ** 2)

    grads = eqx.filter_jit(eqx.filter_grad(loss))(deq)
    assert grads.z0.dtype == jnp.float32 and jnp.any(grads.z0 != 0)
    assert jnp.any(grads.cell.linear_z.weight != 0)


def _tuple_fn(z, args):
    a, b = z
    return jnp.tanh(args @ a + 0.5 * b[:3]), jnp.sin(b) * jnp.cos(a).sum()


@pytest.mark.parametrize(
    "problem", ["mlp_cell", pytest.param("pytree", marks=pytest.mark.slow)]
)
def test_hutchinson_matches_exact_frobenius(problem, getkey):
    if problem == "mlp_cell":
        fn = nn.MLPCell(5, 7, key=getkey())
        z, args = jr.normal(getkey(), (2, 5))
    else:
        fn = _tuple_fn
        z = (jr.normal(getkey(), (3,)), jr.normal(getkey(), (4,)))
        args = jr.normal(getkey(), (3, 3))
    flat_z, unravel = jax.flatten_util.ravel_pytree(z)

    def flat_fn(flat):
        return jax.flatten_util.ravel_pytree(fn(unravel(flat), args))[0]

    exact = jnp.sum(jax.jacfwd(flat_fn)(flat_z) ** 2) / flat_z.size

    def estimate(key):
        return nn.jacobian_frobenius_penalty(fn, z, args, key=key)

    samples = np.asarray(jax.jit(jax.vmap(estimate))(jr.split(getkey(), 2000)))
    stderr = samples.std(ddof=1) / np.sqrt(samples.size)
    assert stderr > 0
    assert abs(samples.mean() - exact) < 3 * stderr
    averaged = nn.jacobian_frobenius_penalty(fn, z, args, key=getkey(), num_samples=8)
    assert averaged.shape == () and averaged > 0
    with pytest.raises(ValueError, match="num_samples"):
        nn.jacobian_frobenius_penalty(fn, z, args, key=getkey(), num_samples=0)


def test_fixed_point_correction_loss():
    iterates = [jnp.array([1.0, 1.0]), jnp.array([2.0, 0.0]), jnp.array([0.5, 0.5])]
    loss = nn.fixed_point_correction_loss(jnp.sum, iterates, gamma=0.5)
    assert jnp.allclose(loss, 0.25 * 2.0 + 0.5 * 2.0 + 1.0)
    with pytest.raises(ValueError, match="gamma"):
        nn.fixed_point_correction_loss(jnp.sum, iterates, gamma=1.5)


def test_count_parameters(getkey):
    mlp = eqx.nn.MLP(3, 2, 5, depth=1, key=getkey())
    assert nn.count_parameters(mlp) == (3 * 5 + 5) + (5 * 2 + 2)
    cell = nn.MLPCell(4, 8, key=getkey())
    assert nn.count_parameters(cell) == (4 * 8 + 8) + 4 * 8 + (8 * 4 + 4)


@pytest.mark.slow  # applies it to every cell of revdeq.nn
def test_apply_weight_norm(getkey):
    for cell, z, x in _cells_and_inputs(getkey()):
        normed = nn.apply_weight_norm(cell)
        twice = nn.apply_weight_norm(normed)
        assert bool(eqx.tree_equal(normed, twice))

        def is_norm(leaf):
            return isinstance(leaf, eqx.nn.WeightNorm)

        leaves = jax.tree_util.tree_leaves(normed, is_leaf=is_norm)
        assert sum(map(is_norm, leaves)) == {nn.MLPCell: 3, nn.ConvCell: 2}.get(
            type(cell),
            6,  # TransformerCell: q, k, v, o and two MLP layers
        )
        apply = eqx.filter_jit(lambda c: jax.vmap(c)(z, x))
        assert jnp.allclose(apply(cell), apply(normed), atol=1e-5)


def _gradient_pair(make_model, data, loss):
    grads = []
    for adjoint in (revdeq.UnrolledAdjoint(), revdeq.ReversibleAdjoint()):
        model = make_model(adjoint)
        grads.append(eqx.filter_jit(eqx.filter_grad(loss))(model, data))
    return grads


@pytest.mark.slow
def test_language_model_reversible_gradients_match_unrolled(getkey):
    key = getkey()
    tokens = jr.randint(getkey(), (2, 6), 0, 11)

    def make_model(adjoint):
        return nn.DEQLanguageModel(11, 6, 8, 2, mlp_ratio=2, adjoint=adjoint, key=key)

    def loss(model, tokens):
        logits = jax.vmap(model)(tokens)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])

    unrolled, reversible = _gradient_pair(make_model, tokens, loss)
    assert relative_error(reversible, unrolled) < 1e-4


@pytest.mark.slow  # compile-heavy; CI runs it after `make test`
def test_resnet_reversible_gradients_match_unrolled(getkey):
    key = getkey()
    images = jr.normal(getkey(), (2, 3, 6, 6))

    def make_model(adjoint):
        return nn.ImplicitResNet(
            (3, 6, 6),
            5,
            channels=(4,),
            width_expansions=(1,),
            max_steps=(2,),
            group_size=2,
            adjoint=adjoint,
            key=key,
        )

    def loss(model, images):
        return jnp.mean(jax.vmap(model)(images) ** 2)

    unrolled, reversible = _gradient_pair(make_model, images, loss)
    assert relative_error(reversible, unrolled) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("steps", [4, 16, 64])
def test_language_model_exact_state_gradient_matches_float64_truth(getkey, steps):
    """The default model: a position-wise `ExactState`, float32 parameters, against
    autodiff of the same reversible iteration in float64 (a scan, which compiles
    faster than an unrolled loop of 64 steps)."""
    vocab, seq_len = 11, 6
    model = nn.DEQLanguageModel(
        vocab, seq_len, 8, 2, mlp_ratio=2, max_steps=steps, key=getkey()
    )
    tokens = jr.randint(getkey(), (2, seq_len), 0, vocab)

    def loss(model, stage=None):
        def logits(t):
            return model(t) if stage is None else model.trunk(t, stage)

        out = jax.vmap(logits)(tokens)
        return jnp.mean(jax.nn.logsumexp(out, axis=-1) - out[..., 0])

    def plain_loss(model):
        def stage(x):
            def step(yz, _):
                y, z = yz
                y = 0.5 * y + 0.5 * model.deq.cell(z, x)
                return (y, 0.5 * z + 0.5 * model.deq.cell(y, x)), None

            z0 = jnp.zeros_like(x)
            return jax.lax.scan(step, (z0, z0), length=steps)[0][1], None

        return loss(model, stage)

    got = eqx.filter_jit(eqx.filter_grad(loss))(model)
    with jax.enable_x64(True):
        model64 = jax.tree.map(
            lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, model
        )
        truth = eqx.filter_jit(eqx.filter_grad(plain_loss))(model64)
        truth = jax.tree.map(np.asarray, truth)
    # Measured: 3e-7 at 4 steps, 1e-5 at 64 (the extra headroom costs resolution);
    # the same scan in float32 is within 3e-7.
    assert relative_error(got, truth) < 1e-4
