"""The demo run by `make demo`: train a Reversible DEQ on Fashion-MNIST on the CPU.

Run: `python experiments/demo.py`. A small classifier, fast on 2 CPU cores: two
stride-2 convolutions with group norm and ReLU, a linear projection to 128 features,
a RevDEQ layer over them (an `MLPCell`, 4 reversible steps at β = 0.8, exact
gradients) and a linear head. It trains on the full 60k/10k split for 8 epochs of
AdamW, prints the results table and writes `runs/demo/results.json`; on 2 CPU cores
it reaches about 91% test accuracy in under 10 minutes. `--model all` trains the
same classifier with a DEQ (Anderson, implicit gradients), phantom gradients and a
weight-untied stack in place of the RevDEQ layer, each at the same forward
evaluations. Options, e.g. `--epochs 2`, override the demo's.

The comparison of the paper's convolutional `ImplicitResNet` is
`experiments/image_classification.py`.
"""

import argparse
import pathlib

import _common
import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray

import revdeq


_DEFAULTS = dict(epochs=8, batch_size=128, lr=2e-3, steps=4, out="runs/demo")


class FashionClassifier(eqx.Module):
    """Two stride-2 convolutions with group norm and ReLU, a linear projection to
    `width` features, an equilibrium stage on them, and a linear head."""

    convs: tuple[eqx.nn.Conv2d, ...]
    norms: tuple[eqx.nn.GroupNorm, ...]
    project: eqx.nn.Linear
    stage: revdeq.nn.DEQ | revdeq.nn.ExplicitStack
    head: eqx.nn.Linear

    def __init__(
        self,
        variant: str,
        *,
        steps: int,
        beta: float,
        channels: int = 32,
        width: int = 128,
        hidden: int = 256,
        key: PRNGKeyArray,
    ) -> None:
        keys = jax.random.split(key, 5)
        sizes = (1, channels, 2 * channels)
        self.convs = tuple(
            eqx.nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, key=k)
            for c_in, c_out, k in zip(sizes[:-1], sizes[1:], keys[:2])
        )
        self.norms = tuple(eqx.nn.GroupNorm(min(c, 8), c) for c in sizes[1:])
        self.project = eqx.nn.Linear(sizes[-1] * 7 * 7, width, key=keys[2])

        def make_cell(k: PRNGKeyArray) -> revdeq.nn.MLPCell:
            return revdeq.nn.MLPCell(width, hidden, key=k)

        if variant == "explicit":
            evals = _common.forward_evals(steps)
            self.stage = revdeq.nn.ExplicitStack(make_cell, evals, key=keys[3])
        else:
            config = _common.equilibrium_config(variant, steps, beta)
            self.stage = revdeq.nn.DEQ(make_cell(keys[3]), (width,), **config)
        self.head = eqx.nn.Linear(width, 10, key=keys[4])

    def __call__(self, image: Float[Array, "1 28 28"]) -> Float[Array, " 10"]:
        x = image
        for conv, norm in zip(self.convs, self.norms):
            x = jax.nn.relu(norm(conv(x)))
        z, _ = self.stage(self.project(x.reshape(-1)))
        return self.head(z)


def loss_fn(model: FashionClassifier, batch: tuple[Array, Array], key: PRNGKeyArray):
    del key
    images, labels = batch
    logits = _common.image_logits(model, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, {"accuracy": jnp.mean(logits.argmax(-1) == labels)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _common.add_common_arguments(parser, out=_DEFAULTS["out"])
    parser.set_defaults(**_DEFAULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Train the requested models, print and write the reports, return the results."""
    args = parse_args(argv)
    task = _common.ImageTask(revdeq.data.load_fashion_mnist(), args)
    out = pathlib.Path(args.out)

    results = {}
    for variant in _common.selected_variants(args.model):
        model = FashionClassifier(
            variant, steps=args.steps, beta=args.beta, key=jax.random.key(args.seed)
        )
        model, summary = _common.train(
            model,
            loss_fn,
            task.evaluate,
            task.batches,
            num_batches=task.num_batches,
            args=args,
            out=out / variant,
        )
        example = jax.tree.map(lambda a: a[:1], next(task.batches(jax.random.key(0))))
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
