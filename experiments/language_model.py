"""Causal language modelling with a Reversible DEQ Transformer and its baselines.

Run: `python experiments/language_model.py --model all --limit-train 2000`; see
`--help`. By default the corpus is byte-level text of the Python standard library's
sources (offline); `--text-files` uses your own files, `--dataset wikitext103` loads
Wikitext-103 through Hugging Face `datasets`. RevDEQ runs a fixed number of
`Reversible` steps (beta 0.5, float state) so that the model stays exactly causal;
the DEQ and phantom baselines iterate plainly (Anderson would mix positions), and
every variant gets `2 * steps + 1` forward evaluations (see
`experiments/_common.py`).

`--paper` sets the paper's Wikitext-103 model (width 768, 12 heads, sequences of 448
GPT-2 tokens, vocabulary 50304, MLP depth 2); it needs a GPT-2 tokenizer from
`tiktoken` or `transformers`, which must be installed with its files cached.

Writes, under `--out`: `results.json` and `results.md` (per model:
`validation_perplexity`, `test_perplexity`, `tokens_per_second`, `wall_time_s`,
`nfe_forward`, `nfe_backward`, `peak_memory_bytes`, `num_params`),
`learning_curves.png`, and per model `metrics.jsonl` and `checkpoints/`.
"""

import argparse
import math
import pathlib

import _common
import jax
import numpy as np
import optax

import revdeq


_PAPER = dict(dim=768, num_heads=12, seq_len=448, mlp_depth=2, vocab_size=50304)


def loss_fn(model, batch, key):
    del key
    inputs, targets = batch
    logits = jax.vmap(model)(inputs)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return loss, {}


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
    parser.add_argument("--dim", type=int, default=128, help="(%(default)s)")
    parser.add_argument("--num-heads", type=int, default=4, help="(%(default)s)")
    parser.add_argument("--seq-len", type=int, default=128, help="(%(default)s)")
    parser.add_argument("--mlp-depth", type=int, default=1, help="(%(default)s)")
    parser.add_argument(
        "--paper",
        action="store_true",
        help="the paper's Wikitext-103 configuration (see above)",
    )
    _common.add_common_arguments(parser, out="runs/language_model")
    parser.set_defaults(beta=0.5, batch_size=16, lr=1e-3)
    args = parser.parse_args(argv)
    if args.model == "deq":
        parser.error(_NO_IMPLICIT)
    args.vocab_size = revdeq.data.BYTE_VOCAB_SIZE
    if args.paper:
        vars(args).update(_PAPER, dataset="wikitext103")
    return args


# The transformer cell is residual, z + g(z), so the iteration does not contract and
# the implicit backward system (I − ∂f/∂z)ᵀ w = g has no convergent iterative solve.
_NO_IMPLICIT = (
    "the implicit-gradient DEQ needs a contractive cell, and the residual "
    "TransformerCell (z + g(z)) is not one: its backward linear solve cannot converge. "
    "Compare against --model phantom or explicit instead."
)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Train every requested model, write the reports and return the results.

    `--limit-train` and `--limit-test` count sequences of `--seq-len` tokens.
    """
    args = parse_args(argv)
    revdeq.train.maybe_initialize_distributed()
    if args.dataset == "wikitext103":
        corpus = revdeq.data.load_wikitext103()
    else:
        corpus = revdeq.data.load_text_corpus(args.text_files, max_bytes=args.max_bytes)
    if args.paper:
        corpus = gpt2_tokens(corpus)

    def first(tokens, num_sequences):
        return (
            tokens
            if num_sequences is None
            else tokens[: num_sequences * args.seq_len + 1]
        )

    train_tokens = first(corpus["train"], args.limit_train)
    held_out = {
        split: first(corpus[split], args.limit_test) for split in ("validation", "test")
    }
    out = pathlib.Path(args.out)

    def batches(key):
        return revdeq.data.sequence_batches(
            train_tokens, args.seq_len, args.batch_size, key=key
        )

    @revdeq.train.make_eval_step
    def mean_loss(model, batch):
        return {"loss": loss_fn(model, batch, None)[0]}

    def evaluate(model):
        metrics = {}
        for split, tokens in held_out.items():
            losses = [
                float(mean_loss(model, batch)["loss"])
                for batch in revdeq.data.sequence_batches(
                    tokens, args.seq_len, args.batch_size, shuffle=False
                )
            ]
            metrics[f"{split}_perplexity"] = math.exp(np.mean(losses))
        return metrics

    model_args = (args.vocab_size, args.seq_len, args.dim, args.num_heads)
    results = {}
    for variant in _common.selected_variants(args.model):
        if variant == "deq":
            print(f"Skipping deq: {_NO_IMPLICIT}")
            continue
        key = jax.random.key(args.seed)
        if variant == "explicit":
            model = revdeq.nn.ExplicitLanguageModel(
                *model_args, key=key, num_layers=_common.forward_evals(args.steps)
            )
        else:
            config = _common.equilibrium_config(
                variant, args.steps, args.beta, causal=True
            )
            model = revdeq.nn.DEQLanguageModel(
                *model_args, key=key, mlp_depth=args.mlp_depth, **config
            )
        num_batches = ((len(train_tokens) - 1) // args.seq_len) // args.batch_size
        model, summary = _common.train(
            model,
            loss_fn,
            evaluate,
            batches,
            num_batches=num_batches,
            args=args,
            out=out / variant,
        )
        example = jax.tree.map(lambda a: a[:1], next(batches(jax.random.key(0))))
        train_tokens_seen = summary["steps"] * args.batch_size * args.seq_len
        results[variant] = {
            "validation_perplexity": summary["validation_perplexity"],
            "test_perplexity": summary["test_perplexity"],
            "tokens_per_second": train_tokens_seen / summary["train_time_s"],
            "wall_time_s": summary["wall_time_s"],
            **_common.count_fn_evals(model, loss_fn, example),
            "peak_memory_bytes": summary["peak_memory_bytes"],
            "num_params": revdeq.nn.count_parameters(model),
        }
    print(_common.write_reports(out, results))
    return results


if __name__ == "__main__":
    main()
