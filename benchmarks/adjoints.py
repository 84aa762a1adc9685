"""Memory, time and evaluation counts of each adjoint.

Run: `python benchmarks/adjoints.py` (a few minutes on 2 CPU cores). Prints three
Markdown tables:

1. compiled temporary memory of a batched `value_and_grad` for each adjoint at
   4, 16, 64 and 256 solver steps (a tanh cell, d = 256, batch 64);
2. the time of reversible backprop over store-everything backprop of the same
   iteration written as straight-line code (a Python loop), measured side by side:
   for an MLP cell, and for training steps of conv models on Fashion-MNIST-shaped
   batches, called as users call them (`vmap` inside, `jit` around the step);
3. the evaluations of `f` per step in the reversible backward pass, counted.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from _common import (
    batched_value_and_grad,
    interleaved_medians,
    markdown_table,
    solve_value,
)

import revdeq
from revdeq.testing import (
    TanhCell,
    compiled_memory,
    plain_reversible_loop,
)


BETA = 0.8
FIXED = dict(rtol=0.0, atol=0.0)  # every solve runs exactly `max_steps` steps
# Cost is measured here, not exactness (see exactness.py): no certificate check.
UNCHECKED = revdeq.ReversibleAdjoint(drift_tolerance=float("inf"))


def _variants(steps):
    reversible = revdeq.Reversible(beta=BETA, **FIXED)
    iteration = revdeq.FixedPointIteration(damping=BETA, **FIXED)
    float_state = revdeq.Reversible(beta=BETA, precision=revdeq.FloatState(), **FIXED)
    solve = functools.partial(solve_value, steps=steps)
    return {
        "store-all (straight-line)": functools.partial(
            plain_reversible_loop, beta=BETA, steps=steps
        ),
        "store-all (lax.scan)": functools.partial(
            plain_reversible_loop, beta=BETA, steps=steps, scan=True
        ),
        "UnrolledAdjoint (checkpointed)": functools.partial(
            solve, solver=reversible, adjoint=revdeq.UnrolledAdjoint()
        ),
        "ImplicitAdjoint": functools.partial(
            solve, solver=iteration, adjoint=revdeq.ImplicitAdjoint()
        ),
        "PhantomAdjoint(steps=5)": functools.partial(
            solve, solver=iteration, adjoint=revdeq.PhantomAdjoint(steps=5)
        ),
        "ReversibleAdjoint, ExactState": functools.partial(
            solve, solver=reversible, adjoint=UNCHECKED
        ),
        "ReversibleAdjoint, FloatState": functools.partial(
            solve, solver=float_state, adjoint=UNCHECKED
        ),
    }


def memory_table(dim=256, batch=64, steps_grid=(4, 16, 64, 256)):
    keys = jax.random.split(jax.random.key(0), 2)
    cell = TanhCell(dim, key=keys[0])
    z0s = jnp.zeros((batch, dim))
    xs = jax.random.normal(keys[1], (batch, dim))
    rows = {}
    for steps in steps_grid:
        for name, single in _variants(steps).items():
            fn = batched_value_and_grad(single)
            rows.setdefault(name, []).append(compiled_memory(fn, cell, z0s, xs))
    table = [
        [name, *(f"{b / 2**20:.2f}" for b in mem), f"{mem[-1] / mem[0]:.2f}"]
        for name, mem in rows.items()
    ]
    ratio = f"{steps_grid[-1]} / {steps_grid[0]}"
    header = ["adjoint", *(f"{s} steps (MiB)" for s in steps_grid), ratio]
    return markdown_table(header, table)


def _plain_stage(stage: revdeq.nn.DEQ):
    """A DEQ stage as a straight-line loop of its reversible iteration."""

    def run(x):
        z0 = jnp.zeros(stage.state_shape, stage.state_dtype)
        return plain_reversible_loop(stage.cell, z0, x, BETA, stage.max_steps), None

    return run


def _train_step(logits):
    """A jitted `value_and_grad` of the cross-entropy of `logits(model, image)`,
    vmapped over the batch."""

    def loss(model, images, labels):
        out = jax.vmap(logits, in_axes=(None, 0))(model, images)
        picked = jnp.take_along_axis(jax.nn.log_softmax(out), labels[:, None], 1)
        return -jnp.mean(picked)

    return eqx.filter_jit(eqx.filter_value_and_grad(loss))


def _resnet_steps(**config):
    """Training steps of an `ImplicitResNet` with each precision, and of the same
    model with every stage a straight-line loop."""

    def make(precision, adjoint):
        solver = revdeq.Reversible(beta=BETA, precision=precision, **FIXED)
        return revdeq.nn.ImplicitResNet(
            (1, 28, 28),
            10,
            key=jax.random.key(3),
            solver=solver,
            adjoint=adjoint,
            **config,
        )

    # ExactState with its certificate, as by default. A float state drifts, and is
    # timed unchecked.
    model = make(revdeq.ExactState(), revdeq.ReversibleAdjoint())

    def plain(model, image):
        return model.trunk(image, [_plain_stage(s) for s in model.stages])

    reversible = _train_step(type(model).__call__)
    steps = {
        "store-all (straight-line)": _train_step(plain),
        "ExactState": reversible,
        "FloatState": reversible,
    }
    models = {
        "store-all (straight-line)": model,
        "ExactState": model,
        "FloatState": make(revdeq.FloatState(), UNCHECKED),
    }
    return steps, models


def _gradient_gap(fns, models, *args) -> float:
    """The largest relative difference of a reversible gradient from the
    straight-line one."""
    yardstick = "store-all (straight-line)"
    _, base = fns[yardstick](models[yardstick], *args)
    gap = 0.0
    for name in ("ExactState", "FloatState"):
        _, grads = fns[name](models[name], *args)
        for g, b in zip(jax.tree.leaves(grads), jax.tree.leaves(base)):
            scale = float(jnp.max(jnp.abs(b))) or 1.0
            gap = max(gap, float(jnp.max(jnp.abs(g - b))) / scale)
    return gap


def time_table(mlp_steps=8, batch=128):
    keys = jax.random.split(jax.random.key(1), 4)
    rows = []
    # The MLP cell: one batched DEQ solve.
    cell, z0s = TanhCell(256, key=keys[0]), jnp.zeros((64, 256))
    xs = jax.random.normal(keys[1], (64, 256))
    variants = _variants(mlp_steps)
    names = {
        "store-all (straight-line)": "store-all (straight-line)",
        "store-all (lax.scan)": "store-all (lax.scan)",
        "ExactState": "ReversibleAdjoint, ExactState",
        "FloatState": "ReversibleAdjoint, FloatState",
    }
    fns = {k: batched_value_and_grad(variants[v]) for k, v in names.items()}
    t = interleaved_medians(fns, cell, z0s, xs)
    rows.append((f"MLP (tanh) cell, d = 256, batch 64, {mlp_steps} steps", t, None))
    # Training steps of conv models, the issue of XLA:CPU's loop bodies.
    images = jax.random.normal(keys[2], (batch, 1, 28, 28))
    labels = jax.random.randint(keys[3], (batch,), 0, 10)
    configs = {
        f"conv DEQ train step (ConvCell, 16 channels, 2 steps), batch {batch}": dict(
            channels=(16,), width_expansions=(1,), max_steps=(2,), group_size=4
        ),
        f"ImplicitResNet train step (16-32 channels, 4+4 steps), batch {batch}": {},
    }
    for name, config in configs.items():
        steps, models = _resnet_steps(**config)
        gap = _gradient_gap(steps, models, images, labels)
        t = _interleaved_models(steps, models, images, labels)
        rows.append((name, t, gap))
    table = []
    for name, t, gap in rows:
        base = t["store-all (straight-line)"]
        scan = t.get("store-all (lax.scan)")
        table.append(
            [
                name,
                f"{base * 1e3:.1f}",
                "—" if scan is None else f"{scan / base:.2f}",
                f"{t['ExactState'] / base:.2f}",
                f"{t['FloatState'] / base:.2f}",
                "—" if gap is None else f"{gap:.1e}",
            ]
        )
    header = [
        "step",
        "store-all, straight-line (ms)",
        "store-all lax.scan / straight-line",
        "ExactState / straight-line",
        "FloatState / straight-line",
        "largest gradient gap",
    ]
    return markdown_table(header, table)


def _interleaved_models(steps, models, *args):
    """`interleaved_medians` for steps that each take their own model."""
    fns = {name: functools.partial(fn, models[name]) for name, fn in steps.items()}
    return interleaved_medians(fns, *args)


def backward_evaluations(steps=6):
    cell = TanhCell(16, key=jax.random.key(2))
    count = []

    def counted(z, x):
        jax.debug.callback(lambda: count.append(None))
        return cell(z, x)

    solver = revdeq.Reversible(beta=BETA, **FIXED)
    out, vjp = jax.vjp(
        lambda x: (
            revdeq.solve(
                counted, jnp.zeros(16), x, solver=solver, max_steps=steps
            ).value
        ),
        jnp.ones(16),
    )
    jax.block_until_ready(out)
    forward = len(count)
    jax.block_until_ready(vjp(jnp.ones(16)))
    backward = len(count) - forward
    return markdown_table(
        ["steps", "forward evals", "backward evals", "backward evals / step"],
        [[steps, forward, backward, f"{backward / steps:.2f}"]],
    )


if __name__ == "__main__":
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, beta = {BETA}\n")
    print("Compiled temporary memory of batched value_and_grad\n")
    print(memory_table(), "\n")
    print("Time of a jitted, vmapped value_and_grad, relative to store-all\n")
    print(time_table(), "\n")
    print("Evaluations of f in the reversible backward pass\n")
    print(backward_evaluations())
