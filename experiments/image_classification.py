"""Image classification with a Reversible DEQ and its baselines.

Run: `python experiments/image_classification.py --model all --epochs 2`; see
`--help`. The classifier is a strided convolutional stem, an equilibrium layer over
a feature vector (an `MLPCell` solved by each variant, or a weight-untied stack for
`explicit`) and a linear head. Every variant gets the same forward evaluations of
its cell, `2 * steps + 1`, as explained in `experiments/_common.py`.

Writes, under `--out`: `results.json` and `results.md` (per model: `test_accuracy`,
`wall_time_s`, `nfe_forward`, `nfe_backward` per example, `peak_memory_bytes` of the
training step, `num_params`), `learning_curves.png`, and per model `metrics.jsonl`
and `checkpoints/`. Fashion-MNIST is read offline from the Debian package
`dataset-fashion-mnist`; CIFAR-10 needs the Hugging Face Hub or its cache.
"""

import argparse
import pathlib

import _common
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

import revdeq


_LOADERS = {
    "fashion-mnist": revdeq.data.load_fashion_mnist,
    "cifar10": revdeq.data.load_cifar10,
}
_EVAL_BATCH = 500


class ImageClassifier(eqx.Module):
    """Two stride-2 convolutions with group norm and ReLU, a linear projection to
    `width` features, an equilibrium stage on them, and a linear head."""

    convs: tuple[eqx.nn.Conv2d, ...]
    norms: tuple[eqx.nn.GroupNorm, ...]
    project: eqx.nn.Linear
    stage: eqx.Module
    head: eqx.nn.Linear

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_classes: int,
        variant: str,
        *,
        steps: int,
        beta: float,
        channels: int,
        width: int,
        hidden: int,
        key: PRNGKeyArray,
    ):
        keys = jax.random.split(key, 5)
        in_channels, height, width_px = image_shape
        sizes = (in_channels, channels, 2 * channels)
        self.convs = tuple(
            eqx.nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, key=k)
            for c_in, c_out, k in zip(sizes[:-1], sizes[1:], keys[:2])
        )
        self.norms = tuple(eqx.nn.GroupNorm(min(c, 8), c) for c in sizes[1:])
        features = sizes[-1] * -(-height // 4) * -(-width_px // 4)
        self.project = eqx.nn.Linear(features, width, key=keys[2])

        def make_cell(k):
            return revdeq.nn.MLPCell(width, hidden, key=k)

        if variant == "explicit":
            self.stage = revdeq.nn.ExplicitStack(
                make_cell, _common.forward_evals(steps), key=keys[3]
            )
        else:
            config = _common.equilibrium_config(variant, steps, beta)
            self.stage = revdeq.nn.DEQ(make_cell(keys[3]), (width,), **config)
        self.head = eqx.nn.Linear(width, num_classes, key=keys[4])

    def __call__(self, image: Float[Array, "c h w"]) -> Float[Array, " classes"]:
        x = image
        for conv, norm in zip(self.convs, self.norms):
            x = jax.nn.relu(norm(conv(x)))
        x = self.project(x.reshape(-1))
        z, _ = self.stage(x)
        return self.head(z)


def build_model(args, image_shape, num_classes, variant, key) -> eqx.Module:
    """The small classifier, or with `--paper` the paper's multiscale ResNet: the
    `ImplicitResNet.cifar10()` layout, whose four stages each get the variant's
    solver under the equal budget (or, for `explicit`, that many distinct cells)."""
    if not args.paper:
        return ImageClassifier(
            image_shape,
            num_classes,
            variant,
            steps=args.steps,
            beta=args.beta,
            channels=args.channels,
            width=args.width,
            hidden=args.hidden,
            key=key,
        )
    trunk = revdeq.nn.CIFAR10_TRUNK
    stages = len(trunk["channels"])
    if variant == "explicit":
        layers = (_common.forward_evals(args.steps),) * stages
        return revdeq.nn.ExplicitResNet(
            image_shape, num_classes, num_layers=layers, key=key, **trunk
        )
    config = _common.equilibrium_config(variant, args.steps, args.beta)
    return revdeq.nn.ImplicitResNet(
        image_shape,
        num_classes,
        solver=config["solver"],
        adjoint=config["adjoint"],
        max_steps=(config["max_steps"],) * stages,
        key=key,
        **trunk,
    )


def _logits(model, images):
    """Logits of a channels-last batch, one example at a time under `vmap`."""
    return jax.vmap(model)(jnp.moveaxis(images, -1, -3))


def loss_fn(model, batch, key):
    del key
    images, labels = batch
    logits = _logits(model, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, {"accuracy": jnp.mean(logits.argmax(-1) == labels)}


@eqx.filter_jit
def _num_correct(model, batch):
    images, labels = batch
    return jnp.sum(_logits(model, images).argmax(-1) == labels)


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
        default=32,
        help="channels of the first convolution; the second has "
        "twice as many (%(default)s)",
    )
    parser.add_argument(
        "--width",
        type=int,
        default=128,
        help="size of the equilibrium state (%(default)s)",
    )
    parser.add_argument(
        "--hidden",
        type=int,
        default=256,
        help="hidden width of the equilibrium cell (%(default)s)",
    )
    parser.add_argument(
        "--paper",
        action="store_true",
        help="the paper's CIFAR-10 setting: the multiscale ImplicitResNet "
        "(channels 128-256-256-128, 10.3M parameters) on cifar10",
    )
    _common.add_common_arguments(parser, out="runs/image_classification")
    args = parser.parse_args(argv)
    if args.paper:
        args.dataset = "cifar10"
    return args


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Train every requested model, write the reports and return the results."""
    args = parse_args(argv)
    revdeq.train.maybe_initialize_distributed()
    data = _LOADERS[args.dataset]()
    train_images, train_labels = (a[: args.limit_train] for a in data["train"])
    test_images, test_labels = (a[: args.limit_test] for a in data["test"])
    channels = 1 if train_images.ndim == 3 else train_images.shape[3]
    image_shape = (channels, *train_images.shape[1:3])
    num_classes = int(np.max(data["train"][1])) + 1
    out = pathlib.Path(args.out)

    def batches(key):
        return revdeq.data.image_batches(
            train_images, train_labels, args.batch_size, key=key
        )

    def evaluate(model):
        test = revdeq.data.image_batches(
            test_images, test_labels, _EVAL_BATCH, shuffle=False, drop_last=False
        )
        correct = sum(int(_num_correct(model, batch)) for batch in test)
        return {"test_accuracy": correct / len(test_labels)}

    results = {}
    for variant in _common.selected_variants(args.model):
        model = build_model(
            args, image_shape, num_classes, variant, jax.random.key(args.seed)
        )
        model, summary = _common.train(
            model,
            loss_fn,
            evaluate,
            batches,
            num_batches=len(train_labels) // args.batch_size,
            args=args,
            out=out / variant,
        )
        example = next(batches(jax.random.key(0)))
        example = jax.tree.map(lambda a: a[:1], example)
        results[variant] = {
            "test_accuracy": summary["test_accuracy"],
            "wall_time_s": summary["wall_time_s"],
            **_common.count_fn_evals(model, loss_fn, example),
            "peak_memory_bytes": summary["peak_memory_bytes"],
            "num_params": revdeq.nn.count_parameters(model),
        }
    print(_common.write_reports(out, results))
    return results


if __name__ == "__main__":
    main()
