"""Helpers shared by the experiment scripts: the command-line options, the model
variants under an equal forward budget, the training loop, and the measurements and
reports written to `--out`.

**Equal forward budget.** `--steps k` gives RevDEQ `k` reversible steps, i.e.
`2k + 1` evaluations of the cell per solve. Every other variant gets the same
`2k + 1` forward evaluations: the DEQ `2k + 1` solver steps with `rtol = atol = 0`,
the phantom DEQ `k + 1` solver steps plus its `k` differentiated damped steps, and
the explicit baseline `2k + 1` distinct cells. The reports give the evaluations
as measured, by counting the calls of the cells (`count_fn_evals`).
"""

import argparse
import json
import pathlib
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import revdeq


VARIANTS = ("revdeq", "deq", "phantom", "explicit")
# Damping of the phantom gradient's differentiated iterations.
PHANTOM_DAMPING = 0.5
_LOG_EVERY = 20
_CELLS = (
    revdeq.nn.MLPCell,
    revdeq.nn.ConvCell,
    revdeq.nn.TransformerCell,
    revdeq.nn.DEQTransformerCell,
)

_EVAL_BATCH = 500


def add_common_arguments(
    parser: argparse.ArgumentParser,
    *,
    out: str,
    variants: tuple[str, ...] = VARIANTS,
    variants_help: str = "revdeq: Reversible solver + ReversibleAdjoint; deq: "
    "implicit-function gradients; phantom: phantom gradients; explicit: weight-untied "
    "stack. All get the same forward evaluations.",
) -> None:
    """The options every experiment takes."""
    parser.add_argument(
        "--model",
        choices=(*variants, "all"),
        default="revdeq",
        help=f"{variants_help} all: each in turn (default: %(default)s).",
    )
    parser.add_argument("--epochs", type=int, default=1, help="(%(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="(%(default)s)")
    parser.add_argument(
        "--lr",
        type=float,
        default=2e-3,
        help="peak AdamW learning rate, after a linear warmup and before a cosine "
        "decay (%(default)s)",
    )
    parser.add_argument(
        "--weight-decay", type=float, default=1e-4, help="(%(default)s)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=4,
        help="reversible solver steps k; every variant gets 2k + 1 "
        "forward evaluations (%(default)s)",
    )
    parser.add_argument(
        "--beta",
        type=float,
        default=0.8,
        help="relaxation of the reversible solver (%(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="(%(default)s)")
    parser.add_argument("--out", default=out, help="output directory (%(default)s)")
    parser.add_argument(
        "--limit-train",
        type=int,
        metavar="N",
        help="train on N examples only, for quick runs (the first N images; N "
        "windows drawn over the whole split for text)",
    )
    parser.add_argument(
        "--limit-test",
        type=int,
        metavar="N",
        help="evaluate on N held-out examples only (the first N images; N windows "
        "strided over the whole split for text)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue each model from its latest checkpoint in --out",
    )


def add_comparison_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """The options of a comparison over seeds and DEQ budgets: `--seeds` and
    `--deq-evals` (the forward evaluations `what`, e.g. "per stage")."""
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="train each model once per seed and report the mean and spread "
        "(default: --seed)",
    )
    parser.add_argument(
        "--deq-evals",
        type=int,
        nargs="+",
        metavar="N",
        help=f"the forward evaluations {what} of each deq run (default: 2k+1, "
        "4k+1, 8k+1)",
    )


def parse_comparison_arguments(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> argparse.Namespace:
    """Parse `argv`, filling in the defaults of `add_comparison_arguments`."""
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = [args.seed]
    if args.deq_evals is None:
        args.deq_evals = [forward_evals(m * args.steps) for m in (1, 2, 4)]
    if any(n < 2 for n in args.deq_evals):
        parser.error("--deq-evals: each budget needs at least 2 evaluations")
    return args


def comparison_runs(
    args: argparse.Namespace, variants: tuple[str, ...]
) -> list[tuple[str, str, int]]:
    """`(name, variant, forward evaluations)` of every model to train: one
    `deq-<evals>` per budget of `--deq-evals`, the others at RevDEQ's."""
    base = forward_evals(args.steps)
    runs = []
    for variant in selected_variants(args.model, variants):
        if variant == "deq":
            runs += [(f"deq-{n}", variant, n) for n in args.deq_evals]
        else:
            runs.append((variant, variant, base))
    return runs


def image_logits(model: Callable, images: jax.Array) -> jax.Array:
    """Logits of a channels-last batch of images, one at a time under `vmap`."""
    return jax.vmap(model)(jnp.moveaxis(images, -1, -3))


@eqx.filter_jit
def _num_correct(model: Callable, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    images, labels = batch
    return jnp.sum(image_logits(model, images).argmax(-1) == labels)


class ImageTask:
    """Training batches and test accuracy on an image dataset, `{"train": (images,
    labels), "test": ...}` as `revdeq.data` loads it, cut to `--limit-train` and
    `--limit-test` images."""

    def __init__(self, data: dict[str, tuple[np.ndarray, np.ndarray]], args) -> None:
        self.train = tuple(a[: args.limit_train] for a in data["train"])
        self.test = tuple(a[: args.limit_test] for a in data["test"])
        self.batch_size: int = args.batch_size
        self.num_batches = len(self.train[1]) // args.batch_size

    def batches(self, key: jax.Array) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        """One epoch of shuffled training batches."""
        return revdeq.data.image_batches(*self.train, self.batch_size, key=key)

    def evaluate(self, model: Callable) -> dict[str, float]:
        """`{"test_accuracy": ...}` over the test images."""
        test = revdeq.data.image_batches(
            *self.test, _EVAL_BATCH, shuffle=False, drop_last=False
        )
        correct = sum(int(_num_correct(model, batch)) for batch in test)
        return {"test_accuracy": correct / len(self.test[1])}


def selected_variants(
    model: str, variants: tuple[str, ...] = VARIANTS
) -> tuple[str, ...]:
    return variants if model == "all" else (model,)


def forward_evals(steps: int) -> int:
    """Forward evaluations per solve of every variant: those of RevDEQ."""
    return 2 * steps + 1


def equilibrium_config(variant: str, steps: int, beta: float) -> dict[str, Any]:
    """`solver`, `adjoint` and `max_steps` of a DEQ variant under the equal budget:
    RevDEQ's `Reversible` steps, or Anderson with implicit (`deq`) or phantom
    gradients."""
    budget = forward_evals(steps)
    if variant == "revdeq":
        solver = revdeq.Reversible(beta=beta, rtol=0, atol=0)
        return dict(solver=solver, adjoint=revdeq.ReversibleAdjoint(), max_steps=steps)
    solver = revdeq.Anderson(rtol=0, atol=0)
    if variant == "deq":
        return dict(solver=solver, adjoint=revdeq.ImplicitAdjoint(), max_steps=budget)
    if variant == "phantom":
        adjoint = revdeq.PhantomAdjoint(steps=steps, damping=PHANTOM_DAMPING)
        return dict(solver=solver, adjoint=adjoint, max_steps=budget - steps)
    raise ValueError(f"{variant!r} is not an equilibrium variant.")


class Residuals:
    """Relative residuals of the solves (forward, or the backward linear solves),
    collected on the host during training, e.g. by `jax.debug.callback` or an
    `ImplicitAdjoint`'s `on_backward_residual`."""

    def __init__(self):
        self.values: list[float] = []

    def append(self, residual) -> None:
        self.values.extend(np.ravel(np.asarray(residual)).tolist())

    def recent_mean(self) -> float:
        """The mean over the last tenth of training."""
        recent = self.values[-max(len(self.values) // 10, 1) :]
        return float(np.mean(recent))


class _Tally:
    """Host-side counts of cell evaluations; a plain object, so no pytree."""

    def __init__(self):
        self.forward = 0
        self.backward = 0

    def add(self, name: str) -> None:
        setattr(self, name, getattr(self, name) + 1)


class _Counted(eqx.Module):
    """A cell that reports each evaluation (`forward`) and each vector-Jacobian
    product (`backward`) to a host-side counter."""

    cell: eqx.Module
    counts: _Tally = eqx.field(static=True)

    def __call__(self, z, x):
        return _counted_call((self.cell, z, x), self.counts)


@eqx.filter_custom_vjp
def _counted_call(cell_z_x, counts):
    cell, z, x = cell_z_x
    jax.debug.callback(lambda: counts.add("forward"))
    return cell(z, x)


@_counted_call.def_fwd
def _counted_call_fwd(perturbed, cell_z_x, counts):
    del perturbed
    return _counted_call.fn(cell_z_x, counts), None


@_counted_call.def_bwd
def _counted_call_bwd(residuals, grad_out, perturbed, cell_z_x, counts):
    del residuals, perturbed
    jax.debug.callback(lambda: counts.add("backward"))
    _, vjp = eqx.filter_vjp(lambda czx: czx[0](czx[1], czx[2]), cell_z_x)
    return vjp(grad_out)[0]


def count_fn_evals(model: eqx.Module, loss_fn: Callable, example: Any) -> dict:
    """Measure the cell evaluations per example: `nfe_forward` in a forward pass,
    and `nfe_backward`, the cell's vector-Jacobian products in a backward pass,
    summed over the model's equilibrium stages. `example` is a batch of one."""
    counts = _Tally()
    counted = jax.tree.map(
        lambda node: _Counted(node, counts) if isinstance(node, _CELLS) else node,
        model,
        is_leaf=lambda node: isinstance(node, _CELLS),
    )
    key = jax.random.key(0)
    jax.block_until_ready(eqx.filter_jit(loss_fn)(counted, example, key))
    jax.effects_barrier()
    nfe_forward = counts.forward
    grad = eqx.filter_jit(eqx.filter_grad(lambda m: loss_fn(m, example, key)[0]))
    jax.block_until_ready(grad(counted))
    jax.effects_barrier()
    return {"nfe_forward": nfe_forward, "nfe_backward": counts.backward}


def train(
    model: eqx.Module,
    loss_fn: Callable,
    evaluate: Callable[[eqx.Module], dict[str, float]],
    batches: Callable[[jax.Array], Iterable[Any]],
    *,
    num_batches: int,
    args: argparse.Namespace,
    out: pathlib.Path,
) -> tuple[eqx.Module, dict[str, Any]]:
    """Train `model` for `args.epochs` epochs with AdamW (warmup, cosine decay),
    data parallel over the local devices, with a checkpoint and an evaluation after
    each epoch.

    **Arguments:**

    - `loss_fn`: `loss_fn(model, batch, key) -> (loss, metrics)` on a batch.
    - `evaluate`: held-out metrics of a model, e.g. `{"test_accuracy": 0.9}`.
    - `batches`: one epoch of training batches, shuffled by the given key.
    - `num_batches`: the number of batches in an epoch.
    - `out`: this model's directory, for `metrics.jsonl` and `checkpoints/`.

    **Returns:**

    The trained model, and a dict of its held-out metrics, `wall_time_s` (training
    and evaluation, summed over resumed runs), `train_time_s`, `steps` and
    `peak_memory_bytes` of the training step.
    """
    total_steps = args.epochs * num_batches
    optimiser = revdeq.train.make_optimiser(
        args.lr,
        total_steps=total_steps,
        warmup_steps=min(total_steps // 10, 500),
        weight_decay=args.weight_decay,
    )
    step_fn = revdeq.train.make_step(loss_fn, optimiser)
    opt_state = revdeq.train.init_optimiser(optimiser, model)
    state = _resume(model, opt_state, out, args.resume)
    logger = revdeq.train.MetricsLogger(out / "metrics.jsonl")
    parallel = revdeq.train.DataParallel(jax.local_devices())
    model, opt_state = parallel.replicate((state.model, state.opt_state))
    data_key, step_key = jax.random.split(jax.random.key(args.seed))
    elapsed, train_time = state.wall_time_s, state.train_time_s
    metrics: dict[str, float] = {}
    root = pathlib.Path(args.out)
    label = str(out.relative_to(root)) if out.is_relative_to(root) else out.name
    for epoch in range(state.first_epoch, args.epochs):
        start = time.perf_counter()
        model, opt_state = _run_epoch(
            step_fn,
            parallel,
            (model, opt_state),
            batches(jax.random.fold_in(data_key, epoch)),
            num_batches=num_batches,
            first_step=epoch * num_batches,
            step_key=step_key,
            logger=logger,
            desc=f"{label} epoch {epoch + 1}/{args.epochs}",
        )
        train_time += time.perf_counter() - start
        metrics = evaluate(model)
        elapsed += time.perf_counter() - start
        _end_epoch(logger, metrics, label, epoch + 1, num_batches)
        extra = {"epoch": epoch + 1, "wall_time_s": elapsed, "train_time_s": train_time}
        step = (epoch + 1) * num_batches
        checkpoints = out / "checkpoints"
        revdeq.train.save_checkpoint(checkpoints, step, model, opt_state, extra, keep=1)
    if not metrics:  # Resumed after the last epoch.
        metrics = evaluate(model)
    sample = parallel.shard_batch(next(iter(batches(data_key))))
    # The training step's own executable: lowering it again finds it in JAX's
    # cache rather than compiling a second program (minutes for a conv model).
    compiled = step_fn.lower(model, opt_state, sample, step_key).compile()
    memory = compiled.compiled.memory_analysis().temp_size_in_bytes
    summary = {
        **metrics,
        "wall_time_s": elapsed,
        "train_time_s": train_time,
        "steps": total_steps,
        "peak_memory_bytes": memory,
    }
    return model, summary


def _run_epoch(
    step_fn: Callable,
    parallel: revdeq.train.DataParallel,
    model_and_opt_state: tuple[eqx.Module, Any],
    batches: Iterable[Any],
    *,
    num_batches: int,
    first_step: int,
    step_key: jax.Array,
    logger: revdeq.train.MetricsLogger,
    desc: str,
) -> tuple[eqx.Module, Any]:
    """One epoch of training steps under a progress bar, logging the training
    metrics every `_LOG_EVERY` steps and at the end."""
    model, opt_state = model_and_opt_state
    progress = tqdm(batches, total=num_batches, desc=desc, leave=False)
    metrics, step = None, first_step
    for step, batch in enumerate(progress, start=first_step):
        key = jax.random.fold_in(step_key, step)
        batch = parallel.shard_batch(batch)
        model, opt_state, metrics = step_fn(model, opt_state, batch, key)
        if step % _LOG_EVERY == 0:
            record = logger.log(step=step, split="train", **metrics)
            progress.set_postfix(loss=f"{record['loss']:.3f}")
    if metrics is not None and step % _LOG_EVERY != 0:
        logger.log(step=step, split="train", **metrics)
    return jax.block_until_ready((model, opt_state))


class _Resumed(NamedTuple):
    """Where training starts: the model and optimiser state, the first epoch still
    to run, and the times already spent."""

    model: eqx.Module
    opt_state: Any
    first_epoch: int
    wall_time_s: float
    train_time_s: float


def _resume(
    model: eqx.Module, opt_state: Any, out: pathlib.Path, resume: bool
) -> _Resumed:
    """The latest checkpoint under `out` with `resume`, else a fresh start with a
    fresh `metrics.jsonl`."""
    checkpoints = out / "checkpoints"
    if resume and revdeq.train.latest_checkpoint(checkpoints) is not None:
        _, model, opt_state, extra = revdeq.train.restore_checkpoint(
            checkpoints, model, opt_state
        )
        epoch, wall, train = extra["epoch"], extra["wall_time_s"], extra["train_time_s"]
        return _Resumed(model, opt_state, epoch, wall, train)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    return _Resumed(model, opt_state, 0, 0.0, 0.0)


def _end_epoch(
    logger: revdeq.train.MetricsLogger,
    metrics: dict[str, float],
    label: str,
    epoch: int,
    num_batches: int,
) -> None:
    """Log an epoch's held-out metrics, and print them above the progress bars."""
    logger.log(step=epoch * num_batches, split="eval", epoch=epoch, **metrics)
    tqdm.write(
        f"{label} epoch {epoch}: "
        + ", ".join(f"{name} {value:.4g}" for name, value in metrics.items())
    )


def write_reports(
    out: pathlib.Path,
    results: dict[str, dict[str, Any]],
    *,
    curve: str = "loss",
    runs: dict[str, pathlib.Path] | None = None,
) -> str:
    """Write `results.json`, `results.md` (one row per model, and per yardstick such
    as an n-gram model; a column that a row lacks shows "–") and
    `learning_curves.png` (the training `curve` of each model, from `runs`, by
    default `out/<model>/metrics.jsonl`) under `out`.

    **Returns:**

    The Markdown table.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    columns = list(dict.fromkeys(c for row in results.values() for c in row))
    lines = [
        "| model | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for name, row in results.items():
        cells = [_format(row[c]) if c in row else "–" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    if runs is None:
        runs = {name: out / name / "metrics.jsonl" for name in results}
    revdeq.train.plot_learning_curves(
        runs, curve, out / "learning_curves.png", title=f"training {curve}"
    )
    return table


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def mean_over_seeds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the rows of several seeds: the mean of each number, and for each
    float its spread, `<name>_spread` (half the range over the seeds)."""
    merged: dict[str, Any] = {}
    for name, first in rows[0].items():
        values = [row[name] for row in rows]
        if isinstance(first, bool) or not isinstance(first, int | float):
            merged[name] = first
            continue
        merged[name] = sum(values) / len(values)
        if isinstance(first, float):
            merged[f"{name}_spread"] = (max(values) - min(values)) / 2
    merged["seeds"] = len(rows)
    return merged


def plot_against_evals(
    results: dict[str, dict[str, Any]], metric: str, out_png: pathlib.Path
) -> None:
    """Each model's `metric` (with its spread over seeds as an error bar) against its
    forward evaluations per solve, as a PNG. A row without evaluations is a yardstick
    (e.g. an n-gram model) and is drawn as a horizontal line."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.add_subplot()
    for name, row in results.items():
        if "nfe_forward" not in row:
            axes.axhline(row[metric], color="0.6", linestyle="--", linewidth=1)
            axes.text(
                0.01,
                row[metric],
                name,
                transform=axes.get_yaxis_transform(),
                color="0.4",
                fontsize="small",
                verticalalignment="bottom",
            )
            continue
        axes.errorbar(
            row["nfe_forward"],
            row[metric],
            yerr=row.get(f"{metric}_spread", 0.0),
            fmt="o",
            capsize=3,
            label=name,
        )
    axes.set_xscale("log", base=2)
    axes.set_xlabel("forward evaluations of the cell per example")
    axes.set_ylabel(metric)
    axes.legend(fontsize="small")
    figure.savefig(out_png, dpi=120)
