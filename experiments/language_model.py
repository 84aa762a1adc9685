r"""Causal language modelling: a Reversible DEQ Transformer against DEQs and explicit
Transformers.

Run the comparison of the README (76 minutes on 2 CPU cores):

    python experiments/language_model.py --model all --seeds 0 1 --steps 2 \
        --dim 64 --num-heads 4 --seq-len 64 --limit-train 8000 --limit-test 400 \
        --lr 3e-3 --epochs 3 --out runs/language_comparison

By default the corpus is byte-level text of the Python standard library's sources
(offline); `--text-files` uses your own files, `--dataset wikitext103` loads
Wikitext-103 through Hugging Face `datasets`.

**The data.** A text corpus is split into three contiguous ranges of its bytes, in
file order: train (the first 90%), validation and test (5% each); a file that
straddles a boundary is cut there. Wikitext-103 comes split. Each split is cut into
windows of `--seq-len + 1` tokens starting every `--seq-len` tokens
(`revdeq.data.sequence_windows`), and windows never cross a split, so no training
window holds a validation or test token. The models train on `--limit-train` of the
train split's windows drawn at random over the whole split (by `--data-seed`, the
same windows for every model and seed), and are evaluated on `--limit-test` windows
evenly strided over the whole of each of the validation and test splits (the same
windows every run); without a limit, on all windows. A model is scored on every
target of every window, each predicted from the tokens before it in its window.

**The yardstick.** Rows `1-gram` to `4-gram` are count-based n-gram models with
add-½ smoothing (`revdeq.data.NGramModel`), fitted in seconds on the same training
windows and scored on the same evaluation windows in the same way. They only count:
a model that does not beat them has learned nothing more.

**The models.** `--steps k` sets the forward budget: RevDEQ's `k` reversible steps
cost `2k + 1` evaluations of the cell per example.

- `revdeq`: `Reversible` steps (β 0.5) on an exact fixed-point state, exact gradients,
  no regulariser, on the RevDEQ paper's pre-norm `TransformerCell` (`z + g(z)`),
  which suits a fixed budget of a few steps but has no fixed point to find.
- `deq`: Bai et al.'s post-norm `DEQTransformerCell`, whose fixed point the solvers
  reach, solved by causal (per-position) Anderson with a history of 2 and
  `rtol = atol = 0`, with implicit gradients from a GMRES solve bounded by the
  forward budget (`restart` = the evaluations, two cycles at most), whose residual
  is logged. It gets what its authors used to stabilise it: weight
  normalisation of the cell (the cell's default) and a Jacobian penalty
  (`--jacobian-penalty`). It runs at each budget of `--deq-evals` (default
  `2k + 1`, `4k + 1` and `8k + 1`), as `deq-<evals>`.
- `deq-noreg`: the same at `2k + 1` evaluations, without weight normalisation
  (`weight_norm=False`) or penalty.
- `phantom`: the weight-normalised `DEQTransformerCell`, causal Anderson, then `k`
  differentiated damped steps (phantom gradients), `2k + 1` evaluations in all.
- `explicit`: a weight-untied Transformer of `2k + 1` layers (equal evaluations).
- `explicit-1`: one layer, the parameters of the DEQs (equal parameters).

The table's `cell` column names each model's cell. `--deq-solver fixed-point`
replaces Anderson by plain fixed-point iteration in the `deq` and `phantom` models.

**Do the DEQs reach a fixed point?** Each equilibrium model reports
`forward_residual`: the relative residual `‖f(z) − z‖ / ‖f(z)‖` of its forward
solve, averaged over the evaluation windows of both held-out splits after
training (training logs it too). For the `deq` models it sits beside
`backward_residual`, the relative residual of the backward linear solve averaged
over the last tenth of training. RevDEQ's forward residual measures how far its
fixed budget of steps is from a fixed point of a cell that has none.

`--paper` sets the paper's Wikitext-103 model (width 768, 12 heads, sequences of 448
GPT-2 tokens, vocabulary 50304, MLP depth 2); it needs a GPT-2 tokenizer from
`tiktoken` or `transformers`, which must be installed with its files cached.

Writes, under `--out`: `results.json` and `results.md` (per model, the mean over
`--seeds` and the spread of each measurement: `test_bits_per_token` (bits per byte on
a byte-level corpus), `validation_bits_per_token`, `tokens_per_second`,
`wall_time_s`, `nfe_forward`, `nfe_backward`, `peak_memory_bytes`, `num_params`,
its `cell`, for the equilibrium models `forward_residual`, and for `deq` models
`backward_residual`; the n-gram rows hold only the bits per token),
`bits_vs_evals.png` (the n-grams as horizontal lines), `learning_curves.png` (seed 0),
and per model and seed `metrics.jsonl` and `checkpoints/`.
"""

import argparse
import functools
import math
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import _common
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optax
from jaxtyping import Integer

import revdeq


_PAPER = dict(dim=768, num_heads=12, seq_len=448, mlp_depth=2, vocab_size=50304)


def gpt2_tokens(corpus: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Re-tokenise a UTF-8 byte corpus with the GPT-2 tokenizer."""
    try:
        import tiktoken

        encode = tiktoken.get_encoding("gpt2").encode_ordinary
    except Exception as tiktoken_error:
        try:
            from transformers import GPT2TokenizerFast

            encode = GPT2TokenizerFast.from_pretrained("gpt2").encode
        except Exception as transformers_error:
            raise RuntimeError(
                "--paper needs the GPT-2 tokenizer, and neither `tiktoken` "
                f"({tiktoken_error}) nor `transformers` ({transformers_error}) could "
                "provide it. Install one (`pip install tiktoken`) on a machine with "
                "network access once, so that its files are cached."
            ) from transformers_error
    return {
        split: np.asarray(encode(tokens.tobytes().decode()), np.int32)
        for split, tokens in corpus.items()
    }


VARIANTS = ("revdeq", "deq", "deq-noreg", "phantom", "explicit", "explicit-1")
NGRAM_ORDERS = (1, 2, 3, 4)
# Anderson with a short history: on the DEQ-Transformer cell at width 32 it reached
# lower forward residuals than the default history of 5 after a short training run,
# and a longer history can stall at a few positions.
_DEQ_SOLVERS = {
    "anderson": revdeq.Anderson(history=2, rtol=0, atol=0),
    "fixed-point": revdeq.FixedPointIteration(rtol=0, atol=0),
}
_VARIANTS_HELP = "See above."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dataset",
        choices=("text", "wikitext103"),
        default="text",
        help="text: bytes of --text-files or of the Python standard "
        "library sources (%(default)s)",
    )
    parser.add_argument(
        "--text-files", nargs="+", metavar="FILE", help="files for --dataset text"
    )
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=20_000_000,
        help="keep the first bytes of a text corpus (%(default)s)",
    )
    parser.add_argument(
        "--data-seed",
        type=int,
        default=0,
        help="the seed that draws the --limit-train training windows, the same for "
        "every model and seed (%(default)s)",
    )
    parser.add_argument("--dim", type=int, default=128, help="(%(default)s)")
    parser.add_argument("--num-heads", type=int, default=4, help="(%(default)s)")
    parser.add_argument("--seq-len", type=int, default=128, help="(%(default)s)")
    parser.add_argument("--mlp-depth", type=int, default=1, help="(%(default)s)")
    parser.add_argument(
        "--deq-solver",
        choices=tuple(_DEQ_SOLVERS),
        default="anderson",
        help="the forward solver of the deq and phantom models (%(default)s)",
    )
    parser.add_argument(
        "--jacobian-penalty",
        type=float,
        default=0.1,
        help="weight of the deq models' Jacobian penalty (%(default)s)",
    )
    parser.add_argument(
        "--paper",
        action="store_true",
        help="the paper's Wikitext-103 configuration (see above)",
    )
    _common.add_common_arguments(
        parser,
        out="runs/language_model",
        variants=VARIANTS,
        variants_help=_VARIANTS_HELP,
    )
    _common.add_comparison_arguments(parser, "per solve")
    parser.set_defaults(beta=0.5, batch_size=16, lr=1e-3)
    args = _common.parse_comparison_arguments(parser, argv)
    args.vocab_size = revdeq.data.BYTE_VOCAB_SIZE
    if args.paper:
        vars(args).update(_PAPER, dataset="wikitext103")
    return args


def build_model(
    args, variant: str, evals: int, key, residuals: _common.Residuals | None
):
    """The model of one variant; `evals` is the deq models' forward budget."""
    model_args = (args.vocab_size, args.seq_len, args.dim, args.num_heads)
    if variant.startswith("explicit"):
        layers = 1 if variant == "explicit-1" else _common.forward_evals(args.steps)
        return revdeq.nn.ExplicitLanguageModel(
            *model_args, key=key, mlp_depth=args.mlp_depth, num_layers=layers
        )
    if variant.startswith("deq"):
        # A backward solve bounded by the forward budget. On this cell it ends at a
        # residual of 1e-7 to 1e-6 and trains as well as `ImplicitAdjoint()`'s
        # default GMRES (to 1e-5, restarts of 20) at a third of its
        # vector-Jacobian products (measured at width 32, 5 evaluations).
        gmres = lx.GMRES(rtol=0, atol=0, restart=evals, max_steps=2)
        implicit = revdeq.ImplicitAdjoint(gmres, on_backward_residual=residuals.append)
        config = dict(adjoint=implicit, max_steps=evals)
    else:
        config = _common.equilibrium_config(variant, args.steps, args.beta)
    if variant != "revdeq":
        config |= dict(
            cell=revdeq.nn.DEQTransformerCell, solver=_DEQ_SOLVERS[args.deq_solver]
        )
    model = revdeq.nn.DEQLanguageModel(
        *model_args, key=key, mlp_depth=args.mlp_depth, **config
    )
    if variant == "deq-noreg":
        cell = model.deq.cell
        plain = revdeq.nn.DEQTransformerCell(
            cell.dim,
            cell.num_heads,
            cell.mlp_ratio,
            key=jax.random.fold_in(key, 1),
            mlp_depth=cell.mlp_depth,
            weight_norm=False,
        )
        model = eqx.tree_at(lambda m: m.deq.cell, model, plain)
    return model


def cell_name(model) -> str:
    """The table's name for a model's cell: its class, with `+ weight norm` where it
    is weight-normalised and `n ×` for a stack of `n` distinct cells."""
    if isinstance(model, revdeq.nn.ExplicitLanguageModel):
        return f"{model.stack.num_layers} × {type(model.stack.cells).__name__}"
    cell = model.deq.cell
    is_norm = lambda node: isinstance(node, eqx.nn.WeightNorm)  # noqa: E731
    normalised = any(map(is_norm, jax.tree.leaves(cell, is_leaf=is_norm)))
    return type(cell).__name__ + (" + weight norm" if normalised else "")


def make_loss(jacobian_penalty: float):
    """Cross-entropy in nats per token, plus, if `jacobian_penalty` is nonzero, that
    multiple of the Jacobian penalty at each sequence's fixed point. An equilibrium
    model also reports the mean relative residual of its forward solves,
    `forward_residual`."""

    def loss_fn(model, batch, key):
        inputs, targets = batch
        if isinstance(model, revdeq.nn.ExplicitLanguageModel):
            logits, solves = jax.vmap(model)(inputs), {}
            penalty = jnp.zeros(())
        else:

            def one(tokens, key):
                x = model.trunk.embed(tokens)
                z, stats = model.deq(x)
                if jacobian_penalty == 0:
                    jac = jnp.zeros(())
                else:
                    fn = model.deq.fn
                    jac = revdeq.nn.jacobian_frobenius_penalty(fn, z, x, key=key)
                return model.trunk.readout(z), stats["residual"], jac

            keys = jax.random.split(key, len(inputs))
            logits, residuals, penalties = jax.vmap(one)(inputs, keys)
            penalty = jnp.mean(penalties)
            solves = {"forward_residual": jnp.mean(residuals)}
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return ce + jacobian_penalty * penalty, {
            "cross_entropy": ce,
            "jacobian": penalty,
            **solves,
        }

    return loss_fn


def _mean_over_windows(steps: list[tuple[int, dict]], name: str) -> float:
    """The mean of a metric over evaluation batches `(windows, metrics)`, each
    weighed by its number of windows."""
    total = sum(size * float(metrics[name]) for size, metrics in steps)
    return total / sum(size for size, _ in steps)


def ngram_rows(
    train_windows: np.ndarray, held_out: dict[str, np.ndarray], vocab_size: int
) -> dict[str, dict[str, float]]:
    """The yardstick: per order, an n-gram model's bits per token on each held-out
    split, fitted on the training windows."""
    rows = {}
    for order in NGRAM_ORDERS:
        ngram = revdeq.data.NGramModel(
            train_windows, order=order, vocab_size=vocab_size
        )
        rows[f"{order}-gram"] = {
            f"{split}_bits_per_token": ngram.bits_per_token(windows)
            for split, windows in held_out.items()
        }
    return rows


class _Windows(NamedTuple):
    """The training windows, and the held-out windows of each split."""

    train: Integer[np.ndarray, "windows window"]
    held_out: dict[str, Integer[np.ndarray, "windows window"]]


def _windows(args: argparse.Namespace) -> _Windows:
    """The corpus of `args`, tokenised and cut into windows of `--seq-len + 1`
    tokens: `--limit-train` drawn at random for training, and the first
    `--limit-test` of each held-out split."""
    if args.dataset == "wikitext103":
        corpus = revdeq.data.load_wikitext103()
    else:
        corpus = revdeq.data.load_text_corpus(args.text_files, max_bytes=args.max_bytes)
    if args.paper:
        corpus = gpt2_tokens(corpus)
    key = jax.random.key(args.data_seed)
    windows = functools.partial(revdeq.data.sequence_windows, seq_len=args.seq_len)
    train = windows(corpus["train"], num_windows=args.limit_train, key=key)
    held_out = {
        split: windows(corpus[split], num_windows=args.limit_test)
        for split in ("validation", "test")
    }
    return _Windows(train, held_out)


def _evaluator(
    args: argparse.Namespace, held_out: dict[str, Integer[np.ndarray, "windows window"]]
) -> Callable[[eqx.Module], dict[str, float]]:
    """`evaluate(model)`: bits per token on each held-out split, and an equilibrium
    model's mean forward residual over both. Means over every target of every
    window."""
    cross_entropy = make_loss(0.0)

    @revdeq.train.make_eval_step
    def eval_step(model, batch):
        loss, metrics = cross_entropy(model, batch, jax.random.key(0))
        solves = {k: v for k, v in metrics.items() if k == "forward_residual"}
        return {"loss": loss, **solves}

    def evaluate(model: eqx.Module) -> dict[str, float]:
        metrics, steps = {}, []
        for split, windows in held_out.items():
            batches = revdeq.data.sequence_batches(
                windows, args.seq_len, args.batch_size, shuffle=False, drop_last=False
            )
            split_steps = [(len(b[0]), eval_step(model, b)) for b in batches]
            nats = _mean_over_windows(split_steps, "loss")
            metrics[f"{split}_bits_per_token"] = nats / math.log(2)
            steps += split_steps
        if "forward_residual" in steps[0][1]:
            metrics["forward_residual"] = _mean_over_windows(steps, "forward_residual")
        return metrics

    return evaluate


def _run_seed(
    args: argparse.Namespace,
    variant: str,
    evals: int | None,
    seed: int,
    windows: _Windows,
    evaluate: Callable[[eqx.Module], dict[str, float]],
    out: pathlib.Path,
) -> dict[str, Any]:
    """Train one model from `seed`, and its row of the report."""
    loss_fn = make_loss(args.jacobian_penalty if variant == "deq" else 0.0)

    def batches(key):
        return revdeq.data.sequence_batches(
            windows.train, args.seq_len, args.batch_size, key=key
        )

    residuals = _common.Residuals()
    model = build_model(args, variant, evals, jax.random.key(seed), residuals)
    model, summary = _common.train(
        model,
        loss_fn,
        evaluate,
        batches,
        num_batches=len(windows.train) // args.batch_size,
        args=argparse.Namespace(**{**vars(args), "seed": seed}),
        out=out,
    )
    example = jax.tree.map(lambda a: a[:1], next(batches(jax.random.key(0))))
    train_tokens_seen = summary["steps"] * args.batch_size * args.seq_len
    row = {
        "cell": cell_name(model),
        "test_bits_per_token": summary["test_bits_per_token"],
        "validation_bits_per_token": summary["validation_bits_per_token"],
        "tokens_per_second": train_tokens_seen / summary["train_time_s"],
        "wall_time_s": summary["wall_time_s"],
        **_common.count_fn_evals(model, loss_fn, example),
        "peak_memory_bytes": summary["peak_memory_bytes"],
        "num_params": revdeq.nn.count_parameters(model),
    }
    if "forward_residual" in summary:
        row["forward_residual"] = summary["forward_residual"]
    if residuals.values:
        row["backward_residual"] = residuals.recent_mean()
    return row


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Train every requested model once per seed, write the reports and return the
    results (per model, the means and spreads over the seeds; then the n-gram rows).

    `--limit-train` and `--limit-test` count windows of `--seq-len + 1` tokens.
    """
    args = parse_args(argv)
    revdeq.train.maybe_initialize_distributed()
    windows = _windows(args)
    evaluate = _evaluator(args, windows.held_out)
    out = pathlib.Path(args.out)
    results = {}
    for name, variant, evals in _common.comparison_runs(args, VARIANTS):
        run = functools.partial(_run_seed, args, variant, evals, windows=windows)
        rows = [
            run(seed, evaluate=evaluate, out=out / name / f"seed-{seed}")
            for seed in args.seeds
        ]
        results[name] = _common.mean_over_seeds(rows)
    runs = {
        name: out / name / f"seed-{args.seeds[0]}" / "metrics.jsonl" for name in results
    }
    results |= ngram_rows(windows.train, windows.held_out, args.vocab_size)
    table = _common.write_reports(out, results, runs=runs)
    _common.plot_against_evals(
        results, "test_bits_per_token", out / "bits_vs_evals.png"
    )
    print(table)
    return results


if __name__ == "__main__":
    main()
