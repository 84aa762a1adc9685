r"""Image classification: the RevDEQ paper's implicit ResNet against DEQs and explicit
ResNets.

Run the comparison (results in the README; see `docs/experiments.md` for its time):

    python experiments/image_classification.py --model all --seeds 0 1 --steps 2 \
        --deq-evals 3 5 9 --limit-train 16384 --limit-test 2000 \
        --out runs/image_comparison

The model is the multiscale `revdeq.nn.ImplicitResNet` of McCallum, Arora & Foster
(arXiv 2509.12917): a conv stem, then per stage an equilibrium solve of a `ConvCell`
(two 3×3 convolutions and three group norms) added to the stage's input, strided
residual blocks between stages, pooling and a linear head. By default it is narrowed
to fit 2 CPU cores: two stages of 8 and 16 channels (`--channels`), cells 1 and 2
times as wide (`--width-expansions`), group norms of 4 channels. The data is
Fashion-MNIST, read offline from the Debian package `dataset-fashion-mnist`: the
models train on the first `--limit-train` training images and are tested on the
first `--limit-test` test images. CIFAR-10 (`--dataset cifar10`) needs the Hugging
Face Hub or its cache.

**The models.** `--steps k` sets the forward budget of each stage: RevDEQ's `k`
reversible steps cost `2k + 1` evaluations of the cell.

- `revdeq`: the model's defaults, `Reversible` steps (β `--beta`, 0.8 as in the
  paper) on an exact fixed-point state (`ExactState`) with `ReversibleAdjoint`: exact
  gradients, no regulariser.
- `deq`: Anderson with `rtol = atol = 0` and implicit gradients from a bounded GMRES
  solve of about as many vector-Jacobian products as forward evaluations, whose
  residual is logged. It gets what its authors used to stabilise it: weight
  normalisation of the cells, a Jacobian penalty at every stage's fixed point (Bai,
  Koltun & Kolter 2021; weight `--jacobian-penalty`), and a fixed-point correction
  (Bai et al. 2022): `--correction-steps` differentiable steps of the last stage's
  cell from its detached fixed point, each scored by the head, with weights decaying
  by 0.8 towards the earlier steps. It runs at each budget of `--deq-evals`
  (default `2k + 1`, `4k + 1` and `8k + 1`), as `deq-<evals>`.
- `deq-noreg`: the same at `2k + 1` evaluations, without any regulariser.
- `phantom`: Anderson, then `k` differentiated damped steps (phantom gradients),
  `2k + 1` evaluations in all.
- `explicit`: an `ExplicitResNet` of `2k + 1` distinct cells per stage (equal
  evaluations).
- `explicit-1`: one cell per stage, the parameters of the implicit models (equal
  parameters; the weight-normalised DEQs have a gain more per output channel).

`--paper` sets the paper's CIFAR-10 model, four stages of 128/256/256/128 channels
(10.3M parameters), on CIFAR-10.

Writes, under `--out`: `results.json` and `results.md` (per model, the mean over
`--seeds` and the spread of each measurement: `test_accuracy`, `images_per_second`,
`wall_time_s`, `nfe_forward` and `nfe_backward` per example summed over the stages
and regularisers, `peak_memory_bytes` of the compiled training step, `num_params`;
for the implicit models `forward_residual`, the relative residual that the solves
reached, and for `deq` models `backward_residual`, that of the backward linear
solves, both averaged over the last tenth of training), `accuracy_vs_evals.png`,
`learning_curves.png` (the first seed), and per model and seed `metrics.jsonl` and
`checkpoints/`.
"""

import argparse
import pathlib
from typing import Any, NamedTuple

import _common
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray, Scalar

import revdeq


_LOADERS = {
    "fashion-mnist": revdeq.data.load_fashion_mnist,
    "cifar10": revdeq.data.load_cifar10,
}
VARIANTS = ("revdeq", "deq", "deq-noreg", "phantom", "explicit", "explicit-1")
_VARIANTS_HELP = "See above."
# The decay of the fixed-point correction's weights towards earlier steps.
CORRECTION_GAMMA = 0.8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dataset",
        choices=tuple(_LOADERS),
        default="fashion-mnist",
        help="(%(default)s)",
    )
    parser.add_argument(
        "--channels",
        type=int,
        nargs="+",
        default=[8, 16],
        help="the channels of each stage (%(default)s)",
    )
    parser.add_argument(
        "--width-expansions",
        type=int,
        nargs="+",
        help="per stage, the hidden channels of its cell as a multiple of its "
        "channels (default: 1, then 2 for every further stage)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=4,
        help="channels per group-norm group; must divide every width (%(default)s)",
    )
    parser.add_argument(
        "--jacobian-penalty",
        type=float,
        default=0.1,
        help="weight of the deq models' Jacobian penalty (%(default)s)",
    )
    parser.add_argument(
        "--correction-steps",
        type=int,
        default=2,
        help="differentiable steps of the deq models' fixed-point correction; 0 "
        "turns it off (%(default)s)",
    )
    parser.add_argument(
        "--paper",
        action="store_true",
        help="the paper's CIFAR-10 setting: the multiscale ImplicitResNet "
        "(channels 128-256-256-128, 10.3M parameters) on cifar10",
    )
    _common.add_common_arguments(
        parser,
        out="runs/image_classification",
        variants=VARIANTS,
        variants_help=_VARIANTS_HELP,
    )
    _common.add_comparison_arguments(parser, "per stage")
    parser.set_defaults(batch_size=64)
    args = _common.parse_comparison_arguments(parser, argv)
    if args.correction_steps < 0:
        parser.error("--correction-steps must be >= 0")
    if args.paper:
        vars(args).update(revdeq.nn.CIFAR10_TRUNK, dataset="cifar10")
    elif args.width_expansions is None:
        args.width_expansions = [1] + [2] * (len(args.channels) - 1)
    if len(args.width_expansions) != len(args.channels):
        parser.error("--width-expansions: give one per entry of --channels")
    return args


def trunk_config(args: argparse.Namespace) -> dict[str, Any]:
    """The layout of the ResNet: `channels`, `width_expansions` and `group_size`."""
    return dict(
        channels=tuple(args.channels),
        width_expansions=tuple(args.width_expansions),
        group_size=args.group_size,
    )


def build_model(
    args: argparse.Namespace,
    image_shape: tuple[int, int, int],
    num_classes: int,
    variant: str,
    key: PRNGKeyArray,
    *,
    evals: int | None = None,
    backward_residuals: _common.Residuals | None = None,
) -> revdeq.nn.ImplicitResNet | revdeq.nn.ExplicitResNet:
    """The model of one variant; `evals` is a deq model's forward budget per stage
    and `backward_residuals` collects its backward residuals."""
    trunk = trunk_config(args)
    stages = len(trunk["channels"])
    if variant.startswith("explicit"):
        layers = 1 if variant == "explicit-1" else _common.forward_evals(args.steps)
        return revdeq.nn.ExplicitResNet(
            image_shape, num_classes, num_layers=(layers,) * stages, key=key, **trunk
        )
    if variant.startswith("deq"):
        if evals is None:
            raise ValueError(f"`evals` is needed for the {variant!r} model.")
        # A bounded backward solve: GMRES spends about one VJP per forward evaluation.
        gmres = lx.GMRES(rtol=0, atol=0, restart=evals, max_steps=2)
        on_backward_residual = (
            None if backward_residuals is None else backward_residuals.append
        )
        config = dict(
            solver=revdeq.Anderson(rtol=0, atol=0),
            adjoint=revdeq.ImplicitAdjoint(
                gmres, on_backward_residual=on_backward_residual
            ),
            max_steps=evals,
        )
    else:
        config = _common.equilibrium_config(variant, args.steps, args.beta)
    max_steps = (config.pop("max_steps"),) * stages
    model = revdeq.nn.ImplicitResNet(
        image_shape, num_classes, max_steps=max_steps, key=key, **trunk, **config
    )
    if variant == "deq":
        model = eqx.tree_at(
            lambda m: [stage.cell for stage in m.stages],
            model,
            replace_fn=revdeq.nn.apply_weight_norm,
        )
    return model


class _Solved(NamedTuple):
    """One stage of one example's forward pass."""

    stage: Any  # a `DEQ` or an `ExplicitStack`
    x: Float[Array, "c h w"]  # its injected input
    z: Float[Array, "c h w"]  # its output
    stats: dict[str, Array]


def _forward(
    model: revdeq.nn.ImplicitResNet | revdeq.nn.ExplicitResNet,
    image: Float[Array, "c h w"],
) -> tuple[Float[Array, " classes"], list[_Solved]]:
    """The logits of one image, and what each stage saw and returned."""
    solved = []

    def recorded(stage):
        def run(x):
            z, stats = stage(x)
            solved.append(_Solved(stage, x, z, stats))
            return z, stats

        return run

    logits = model.trunk(image, [recorded(stage) for stage in model.stages])
    return logits, solved


def make_loss(
    *,
    jacobian_penalty: float = 0.0,
    correction_steps: int = 0,
    forward_residuals: _common.Residuals | None = None,
):
    """Cross-entropy, plus, where nonzero, `jacobian_penalty` times the Jacobian
    penalty summed over the stages' fixed points and a fixed-point correction of
    `correction_steps` steps. `forward_residuals` collects the relative residuals
    that the solves reached."""

    def one(
        model, image: Float[Array, "c h w"], label: Int[Array, ""], key: PRNGKeyArray
    ) -> tuple[Float[Array, " classes"], Scalar, Scalar, Float[Array, " stages"]]:
        logits, solved = _forward(model, image)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, label)
        penalty = jnp.zeros(())
        if jacobian_penalty != 0:
            keys = jax.random.split(key, len(solved))
            for s, k in zip(solved, keys):
                jac = revdeq.nn.jacobian_frobenius_penalty(s.stage.fn, s.z, s.x, key=k)
                penalty = penalty + jac
            loss = loss + jacobian_penalty * penalty
        if correction_steps > 0:
            last = solved[-1]

            def head_loss(z):
                # The trunk's readout of the last stage: pool `x + z`, then the head.
                pooled = jnp.mean(last.x + z.astype(last.x.dtype), axis=(1, 2))
                logits = model.trunk.head(pooled)
                return optax.softmax_cross_entropy_with_integer_labels(logits, label)

            z, iterates = jax.lax.stop_gradient(last.z), []
            for _ in range(correction_steps):
                z = last.stage.fn(z, last.x)
                iterates.append(z)
            loss = loss + revdeq.nn.fixed_point_correction_loss(
                head_loss, iterates, gamma=CORRECTION_GAMMA
            )
        # Explicit stacks report no residual.
        residuals = jnp.stack([s.stats.get("residual", jnp.nan) for s in solved])
        return logits, loss, penalty, residuals

    def loss_fn(model, batch, key):
        images, labels = batch
        keys = jax.random.split(key, len(labels))
        logits, losses, penalties, residuals = jax.vmap(one, in_axes=(None, 0, 0, 0))(
            model, jnp.moveaxis(images, -1, -3), labels, keys
        )
        if forward_residuals is not None:
            jax.debug.callback(forward_residuals.append, residuals)
        return losses.mean(), {
            "accuracy": jnp.mean(logits.argmax(-1) == labels),
            "jacobian": penalties.mean(),
        }

    return loss_fn


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Train every requested model once per seed, write the reports and return the
    results (per model, the means and spreads over the seeds)."""
    args = parse_args(argv)
    revdeq.train.maybe_initialize_distributed()
    data = _LOADERS[args.dataset]()
    task = _common.ImageTask(data, args)
    images = task.train[0]
    channels = 1 if images.ndim == 3 else images.shape[3]
    image_shape = (channels, *images.shape[1:3])
    num_classes = int(np.max(data["train"][1])) + 1
    out = pathlib.Path(args.out)

    results = {}
    for name, variant, evals in _common.comparison_runs(args, VARIANTS):
        rows = []
        for seed in args.seeds:
            forward, backward = _common.Residuals(), _common.Residuals()
            key = jax.random.key(seed)
            model = build_model(
                args,
                image_shape,
                num_classes,
                variant,
                key,
                evals=evals,
                backward_residuals=backward,
            )
            regularised = variant == "deq"
            loss_fn = make_loss(
                jacobian_penalty=args.jacobian_penalty if regularised else 0.0,
                correction_steps=args.correction_steps if regularised else 0,
                forward_residuals=None if variant.startswith("explicit") else forward,
            )
            seed_args = argparse.Namespace(**{**vars(args), "seed": seed})
            model, summary = _common.train(
                model,
                loss_fn,
                task.evaluate,
                task.batches,
                num_batches=task.num_batches,
                args=seed_args,
                out=out / name / f"seed-{seed}",
            )
            example = jax.tree.map(
                lambda a: a[:1], next(task.batches(jax.random.key(0)))
            )
            row = {
                "test_accuracy": summary["test_accuracy"],
                "images_per_second": summary["steps"]
                * args.batch_size
                / summary["train_time_s"],
                "wall_time_s": summary["wall_time_s"],
                **_common.count_fn_evals(model, loss_fn, example),
                "peak_memory_bytes": summary["peak_memory_bytes"],
                "num_params": revdeq.nn.count_parameters(model),
            }
            if forward.values:
                row["forward_residual"] = forward.recent_mean()
            if backward.values:
                row["backward_residual"] = backward.recent_mean()
            rows.append(row)
        results[name] = _common.mean_over_seeds(rows)
    runs = {
        name: out / name / f"seed-{args.seeds[0]}" / "metrics.jsonl" for name in results
    }
    table = _common.write_reports(out, results, runs=runs)
    _common.plot_against_evals(results, "test_accuracy", out / "accuracy_vs_evals.png")
    print(table)
    return results


if __name__ == "__main__":
    main()
