"""Training steps of the paper's two models, RevDEQ against its baselines, on
whatever device JAX sees.

Run: `python benchmarks/paper_scale.py` on an accelerator, or
`python benchmarks/paper_scale.py --reduced`: the same code at CPU sizes, whose time
goes to compiling the six training steps (several minutes on 2 shared cores).

The models are those of the RevDEQ paper (McCallum, Arora & Foster, arXiv
2509.12917) at its sizes:

- `image`: the 4-stage `ImplicitResNet` of its CIFAR-10 experiment (channels
  128/256/256/128, width expansions 1/3/3/1, group norms of 16 channels) on
  3 × 32 × 32 images, 10 classes, batch 64;
- `language`: the Transformer of its Wikitext-103 experiment (width 768, 12 heads,
  an MLP of two hidden layers of width 3072, sequences of 448 tokens, vocabulary
  50304), batch 32 sequences, 14336 tokens. At this batch the explicit model's
  training step compiles to 33 GiB of temporary memory on XLA:CPU (the DEQ's to
  13 GiB), so every configuration fits an 80 GB GPU; 64 sequences would not leave
  a safe margin.

Each trains with three methods at the same `2k + 1 = 9` forward evaluations of the
cell per solve, where `k = 4` is the paper's number of reversible steps:

- `revdeq`: the model's default `Reversible` solver (β 0.8 for images, 0.5 for
  language) with `ReversibleAdjoint`;
- `deq`: Anderson with `ImplicitAdjoint`, 9 steps, as the experiments build their
  `deq` rows: for images the default linear solve; for language Bai et al.'s
  post-norm, weight-normalised `DEQTransformerCell` in place of the paper's
  pre-norm cell, solved by causal Anderson with a history of 2, a GMRES solve
  bounded by the forward budget (`restart` 9, two cycles at most) and a Jacobian
  penalty of weight 0.1 in the loss;
- `explicit`: `ExplicitResNet` and `ExplicitLanguageModel` with 9 distinct cells in
  place of each solve.

Each configuration compiles the experiments' training step once (AdamW with
global-norm clipping, `revdeq.train.make_step`), runs one warm-up step, then times
`--timed-steps` steps on a fixed synthetic batch of the real shapes (random images
and labels, random tokens), each until `jax.block_until_ready`. The configurations
run one after another, each alone on the device.

Writes to `--out` a JSON object, `{"reduced": ..., "configurations": {name: row}}`,
whose rows hold `seconds_per_step` (the median), `step_seconds`,
`examples_per_second` (images, or tokens for language), `compiled_memory_bytes` (the
temporary memory of the compiled step, from its `memory_analysis()`),
`argument_bytes` (model, optimiser state and batch), `compile_seconds`,
`num_params`, `forward_evals` per solve, the final `loss`, `device` and
`jax_version`; and prints them as a Markdown table. A configuration that fails at
run time (e.g. out of memory) gets an `error` instead, and the script exits with
status 1 after running the others.
"""

import argparse
import json
import math
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import optax
from _common import markdown_table
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree, Scalar

import revdeq


STEPS = 4  # reversible steps per solve in both of the paper's models
EVALS = 2 * STEPS + 1  # forward evaluations per solve of every method
IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
JACOBIAN_PENALTY = 0.1  # the language experiment's default for its `deq` rows
LEARNING_RATE = 3e-4  # the paper's AdamW learning rate
FAMILIES = ("image", "language")
METHODS = ("revdeq", "deq", "explicit")
NAMES = tuple(f"{family}/{method}" for family in FAMILIES for method in METHODS)

LossFn = Callable[[eqx.Module, PyTree, PRNGKeyArray], tuple[Scalar, dict]]


class Scale(NamedTuple):
    """The sizes of one run: keyword arguments of the image models' trunks and of
    the language models, the batch sizes and the number of timed steps."""

    image: dict[str, Any]
    language: dict[str, int]
    image_batch: int
    language_batch: int
    timed_steps: int


PAPER = Scale(
    image=revdeq.nn.CIFAR10_TRUNK,
    # As `revdeq.nn.DEQLanguageModel.wikitext103`.
    language=dict(vocab_size=50304, seq_len=448, dim=768, num_heads=12, mlp_depth=2),
    image_batch=64,
    language_batch=32,
    timed_steps=5,
)
REDUCED = Scale(
    # Two stages: each compiles for most of a minute on XLA:CPU.
    image=dict(channels=(8, 16), width_expansions=(1, 3), group_size=4),
    language=dict(vocab_size=256, seq_len=32, dim=32, num_heads=4, mlp_depth=2),
    image_batch=2,
    language_batch=2,
    timed_steps=2,
)


def image_model(method: str, scale: Scale, key: PRNGKeyArray) -> eqx.Module:
    """The paper's CIFAR-10 classifier (narrowed at a reduced `scale`) trained by
    `method`."""
    stages = len(scale.image["channels"])
    if method == "explicit":
        return revdeq.nn.ExplicitResNet(
            IMAGE_SHAPE,
            NUM_CLASSES,
            num_layers=(EVALS,) * stages,
            key=key,
            **scale.image,
        )
    if method == "deq":
        config = dict(
            solver=revdeq.Anderson(rtol=0, atol=0),
            adjoint=revdeq.ImplicitAdjoint(),
            max_steps=(EVALS,) * stages,
        )
    else:
        config = dict(max_steps=(STEPS,) * stages)
    return revdeq.nn.ImplicitResNet.cifar10(key=key, **scale.image, **config)


def language_model(method: str, scale: Scale, key: PRNGKeyArray) -> eqx.Module:
    """The paper's Wikitext-103 model (reduced at a reduced `scale`) trained by
    `method`."""
    if method == "explicit":
        return revdeq.nn.ExplicitLanguageModel(
            **scale.language, num_layers=EVALS, key=key
        )
    if method == "deq":
        gmres = lx.GMRES(rtol=0, atol=0, restart=EVALS, max_steps=2)
        return revdeq.nn.DEQLanguageModel(
            **scale.language,
            cell=revdeq.nn.DEQTransformerCell,
            solver=revdeq.Anderson(history=2, rtol=0, atol=0),
            adjoint=revdeq.ImplicitAdjoint(gmres),
            max_steps=EVALS,
            key=key,
        )
    return revdeq.nn.DEQLanguageModel(**scale.language, max_steps=STEPS, key=key)


def image_loss(
    model: eqx.Module,
    batch: tuple[Float[Array, "batch c h w"], Int[Array, " batch"]],
    key: PRNGKeyArray,
) -> tuple[Scalar, dict]:
    """The mean cross-entropy of a batch of images."""
    del key
    images, labels = batch
    logits = jax.vmap(model)(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), {}


def language_loss(jacobian_penalty: float) -> LossFn:
    """The mean next-token cross-entropy of a batch of sequences, plus, if
    `jacobian_penalty` is nonzero, that multiple of the Jacobian penalty of the
    model's cell at each sequence's fixed point."""

    def loss_fn(
        model: eqx.Module,
        batch: tuple[Int[Array, "batch seq"], Int[Array, "batch seq"]],
        key: PRNGKeyArray,
    ) -> tuple[Scalar, dict]:
        inputs, targets = batch
        if jacobian_penalty == 0:
            logits, penalty = jax.vmap(model)(inputs), jnp.zeros(())
        else:

            def one(tokens: Int[Array, " seq"], key: PRNGKeyArray):
                x = model.trunk.embed(tokens)
                z, _ = model.deq(x)
                jac = revdeq.nn.jacobian_frobenius_penalty(model.deq.fn, z, x, key=key)
                return model.trunk.readout(z), jac

            logits, penalties = jax.vmap(one)(inputs, jr.split(key, len(inputs)))
            penalty = jnp.mean(penalties)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return ce + jacobian_penalty * penalty, {"cross_entropy": ce}

    return loss_fn


def synthetic_batch(
    family: str, scale: Scale, batch_size: int, key: PRNGKeyArray
) -> tuple[Array, Array]:
    """Random images and labels, or random tokens split into inputs and their next
    tokens, of the shapes the model trains on."""
    if family == "image":
        image_key, label_key = jr.split(key)
        images = jr.normal(image_key, (batch_size, *IMAGE_SHAPE))
        labels = jr.randint(label_key, (batch_size,), 0, NUM_CLASSES)
        return images, labels
    vocab_size, seq_len = scale.language["vocab_size"], scale.language["seq_len"]
    tokens = jr.randint(key, (batch_size, seq_len + 1), 0, vocab_size)
    return tokens[:, :-1], tokens[:, 1:]


def measure(
    family: str, method: str, scale: Scale, batch_size: int, key: PRNGKeyArray
) -> dict[str, Any]:
    """Build one configuration, compile its training step once and time it; the
    row of the report."""
    model_key, batch_key, step_key = jr.split(key, 3)
    if family == "image":
        model, loss_fn = image_model(method, scale, model_key), image_loss
    else:
        model = language_model(method, scale, model_key)
        loss_fn = language_loss(JACOBIAN_PENALTY if method == "deq" else 0.0)
    batch = synthetic_batch(family, scale, batch_size, batch_key)
    steps = scale.timed_steps + 1  # a warm-up step, then the timed ones
    optimiser = revdeq.train.make_optimiser(LEARNING_RATE, total_steps=steps)
    opt_state = revdeq.train.init_optimiser(optimiser, model)
    step = revdeq.train.make_step(loss_fn, optimiser)

    start = time.perf_counter()
    compiled = step.lower(model, opt_state, batch, step_key).compile()
    compile_seconds = time.perf_counter() - start
    memory = compiled.compiled.memory_analysis()
    times, metrics = [], {}
    for i in range(steps):
        start = time.perf_counter()
        model, opt_state, metrics = compiled(
            model, opt_state, batch, jr.fold_in(step_key, i)
        )
        jax.block_until_ready((model, opt_state, metrics))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times[1:])
    per_example = 1 if family == "image" else scale.language["seq_len"]
    return {
        "batch_size": batch_size,
        "seconds_per_step": seconds,
        "step_seconds": times[1:],
        "examples_per_second": batch_size * per_example / seconds,
        "unit": "images" if family == "image" else "tokens",
        "compiled_memory_bytes": int(memory.temp_size_in_bytes),
        "argument_bytes": int(memory.argument_size_in_bytes),
        "compile_seconds": compile_seconds,
        "num_params": revdeq.nn.count_parameters(model),
        "forward_evals": EVALS,
        "loss": float(metrics["loss"]),
        "device": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
    }


def table(rows: dict[str, dict[str, Any]]) -> str:
    """The rows as Markdown, each step's time also relative to RevDEQ's on the same
    model."""
    header = ["model", "batch", "parameters", "s / step", "per second",
              "time / revdeq", "compiled memory (GiB)", "compile (s)"]  # fmt: skip
    lines = []
    for name, row in rows.items():
        if "error" in row:
            lines.append([name, *["–"] * (len(header) - 2), row["error"]])
            continue
        revdeq_row = rows.get(name.split("/")[0] + "/revdeq", {})
        ratio = row["seconds_per_step"] / revdeq_row.get("seconds_per_step", math.nan)
        lines.append(
            [
                name,
                row["batch_size"],
                f"{row['num_params']:,}",
                f"{row['seconds_per_step']:.4g}",
                f"{row['examples_per_second']:,.0f} {row['unit']}",
                "–" if math.isnan(ratio) else f"{ratio:.2f}",
                f"{row['compiled_memory_bytes'] / 2**30:.3g}",
                f"{row['compile_seconds']:.1f}",
            ]
        )
    return markdown_table(header, lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--reduced",
        action="store_true",
        help="CPU sizes: two image stages of 8 and 16 channels; width 32, 4 heads, "
        "sequences of 32, vocabulary 256; batch 2; 2 timed steps",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help="images or sequences per step, for both models (default: 64 images "
        "and 32 sequences; 2 with --reduced)",
    )
    parser.add_argument(
        "--timed-steps",
        type=int,
        help="training steps timed after the warm-up step (default: 5; 2 with "
        "--reduced)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=(*FAMILIES, *NAMES),
        default=FAMILIES,
        metavar="NAME",
        help=f"only these models, or families of models: {', '.join(NAMES)} "
        "(default: all)",
    )
    parser.add_argument("--seed", type=int, default=0, help="(%(default)s)")
    parser.add_argument(
        "--out", default="runs/paper_scale.json", help="the JSON file (%(default)s)"
    )
    args = parser.parse_args(argv)
    for flag in ("batch_size", "timed_steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Measure every selected configuration, write the JSON and print the table;
    return the rows."""
    args = parse_args(argv)
    scale = REDUCED if args.reduced else PAPER
    if args.timed_steps is not None:
        scale = scale._replace(timed_steps=args.timed_steps)
    device = jax.devices()[0].device_kind
    print(f"jax {jax.__version__} on {device}", file=sys.stderr, flush=True)
    rows = {}
    for name in NAMES:
        family, method = name.split("/")
        if family not in args.models and name not in args.models:
            continue
        default_batch = scale.image_batch if family == "image" else scale.language_batch
        batch_size = args.batch_size or default_batch
        try:
            row = measure(family, method, scale, batch_size, jr.key(args.seed))
            progress = (
                f"compiled in {row['compile_seconds']:.1f} s, "
                f"{row['seconds_per_step']:.4g} s per step"
            )
        except (jax.errors.JaxRuntimeError, eqx.EquinoxRuntimeError) as error:
            row = {"error": str(error).splitlines()[0], "device": device}
            progress = f"failed: {row['error']}"
        rows[name] = row
        print(f"{name}: {progress}", file=sys.stderr, flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"reduced": args.reduced, "configurations": rows}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    sys.exit(any("error" in row for row in main().values()))
