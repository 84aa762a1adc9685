from typing import NamedTuple

import equinox as eqx
import numpy as np
from jaxtyping import Float64, Int64, Integer


class _Counts(NamedTuple):
    """How often each observed gram of one length, and each of its contexts, occurs.

    A gram of `k + 1` tokens `t_0 ... t_k` is coded as the integer whose digits in
    base `vocab_size` are its tokens; its context `t_0 ... t_{k-1}` is the code
    divided by `vocab_size`. Codes are sorted, for lookup by binary search.
    """

    grams: Int64[np.ndarray, " num_grams"]
    gram_counts: Int64[np.ndarray, " num_grams"]
    contexts: Int64[np.ndarray, " num_contexts"]
    context_counts: Int64[np.ndarray, " num_contexts"]


def _gram_codes(
    sequences: Integer[np.ndarray, "num_sequences length"], size: int, vocab_size: int
) -> Int64[np.ndarray, "num_sequences num_grams"]:
    """The code of every run of `size` consecutive tokens within each sequence."""
    num_grams = sequences.shape[1] - size + 1
    codes = np.zeros((len(sequences), num_grams), np.int64)
    for i in range(size):
        codes *= vocab_size
        codes += sequences[:, i : i + num_grams]
    return codes


def _count(codes: Int64[np.ndarray, " n"], vocab_size: int) -> _Counts:
    grams, gram_counts = np.unique(codes, return_counts=True)
    # Sorted grams have sorted contexts: each context's grams are one run.
    contexts, starts = np.unique(grams // vocab_size, return_index=True)
    context_counts = np.add.reduceat(gram_counts, starts)
    return _Counts(grams, gram_counts, contexts, context_counts)


def _lookup(
    keys: Int64[np.ndarray, " k"],
    counts: Int64[np.ndarray, " k"],
    codes: Int64[np.ndarray, "*shape"],
) -> Int64[np.ndarray, "*shape"]:
    """The count of each code; zero for codes never seen."""
    index = np.minimum(np.searchsorted(keys, codes), len(keys) - 1)
    return np.where(keys[index] == codes, counts[index], 0)


def _check_sequences(
    sequences: Integer[np.ndarray, "num_sequences length"],
    vocab_size: int,
    min_length: int,
) -> None:
    if sequences.ndim != 2:
        raise ValueError(
            f"`sequences` must be two-dimensional, (num_sequences, length), got shape "
            f"{sequences.shape}; pass one stream `tokens` as `tokens[None]`."
        )
    if len(sequences) == 0 or sequences.shape[1] < min_length:
        raise ValueError(
            f"`sequences` must hold at least one sequence of at least {min_length} "
            f"tokens, got shape {sequences.shape}."
        )
    if sequences.min() < 0 or sequences.max() >= vocab_size:
        raise ValueError(
            f"`sequences` holds tokens outside 0..{vocab_size - 1}: "
            f"{sequences.min()}..{sequences.max()}; check `vocab_size`."
        )


class NGramModel(eqx.Module):
    r"""A count-based n-gram language model with additive (add-½) smoothing.

    The probability of token $x$ after the context $c$ of the preceding
    `order - 1` tokens is

    $$p(x \mid c) = \frac{n(c, x) + \alpha}{n(c) + \alpha V},$$

    where $n(c, x)$ counts the occurrences of $c$ followed by $x$ in the training
    sequences, $n(c)$ those of $c$ followed by any token, $V$ is `vocab_size` and
    $\alpha$ is `smoothing`: Lidstone's additive smoothing, add-½ by default. Every
    count stays within one sequence, and so does every context: near the start of a
    sequence, where fewer than `order - 1` tokens precede, the context is all of
    them, counted among the training grams of that shorter length. A token is then
    scored as a causal model that reads the sequence from its start would score it.

    This is a yardstick for neural language models: it needs no training, fits in
    seconds on tens of millions of tokens, and a model that does not beat it has
    learned no more than counting does. Grams are coded as integers, exactly for
    `vocab_size ** order` below $2^{63}$, and counted by sorting (NumPy only).

    ??? cite

        ```bibtex
        @article{chen1999empirical,
            title={An empirical study of smoothing techniques for language
                   modeling},
            author={Chen, Stanley F. and Goodman, Joshua},
            journal={Computer Speech \& Language},
            volume={13},
            number={4},
            pages={359--394},
            year={1999}
        }
        ```

    !!! Example

        ```python
        import numpy as np
        import revdeq


        text = np.frombuffer(b"the cat sat on the mat. " * 200, np.uint8)
        train = revdeq.data.sequence_windows(text, seq_len=64)
        model = revdeq.data.NGramModel(
            train, order=3, vocab_size=revdeq.data.BYTE_VOCAB_SIZE
        )
        bits = model.bits_per_token(train)  # bits per byte of the next-byte targets
        ```
    """

    order: int = eqx.field(static=True)
    vocab_size: int = eqx.field(static=True)
    smoothing: float = eqx.field(static=True)
    counts: tuple[_Counts, ...]

    def __init__(
        self,
        sequences: Integer[np.ndarray, "num_sequences length"],
        *,
        order: int,
        vocab_size: int,
        smoothing: float = 0.5,
    ) -> None:
        r"""**Arguments:**

        - `sequences`: the training token sequences, e.g. the windows of
            [`revdeq.data.sequence_windows`][]; one stream `tokens` is
            `tokens[None]`. Each must hold at least `order` tokens.
        - `order`: the number of tokens in a gram, one more than the longest
            context: 1 is a unigram model, 3 predicts from the two preceding tokens.
        - `vocab_size`: the number of token values, e.g.
            [`revdeq.data.BYTE_VOCAB_SIZE`][].
        - `smoothing`: $\alpha$, the count added to every gram; positive.
        """
        if order < 1:
            raise ValueError(f"`order` must be at least 1, got {order}.")
        if vocab_size < 1:
            raise ValueError(f"`vocab_size` must be at least 1, got {vocab_size}.")
        if vocab_size**order >= 2**63:
            raise ValueError(
                f"`vocab_size ** order` = {vocab_size}**{order} does not fit the "
                "int64 codes of grams; lower `order`."
            )
        if not smoothing > 0:
            raise ValueError(f"`smoothing` must be positive, got {smoothing}.")
        sequences = np.asarray(sequences)
        _check_sequences(sequences, vocab_size, min_length=order)
        self.order = order
        self.vocab_size = vocab_size
        self.smoothing = smoothing
        self.counts = tuple(
            _count(_gram_codes(sequences, k + 1, vocab_size).ravel(), vocab_size)
            for k in range(order)
        )

    def probabilities(
        self, sequences: Integer[np.ndarray, "num_sequences length"]
    ) -> Float64[np.ndarray, "num_sequences length-1"]:
        """The probability of each token after the first, given the tokens before it
        in its sequence (at most `order - 1` of them).

        **Arguments:**

        - `sequences`: token sequences of at least 2 tokens each.

        **Returns:**

        `p[i, t]`, the probability of `sequences[i, t + 1]`: as the predictions of a
        causal model at inputs `sequences[:, :-1]` for targets `sequences[:, 1:]`.
        """
        sequences = np.asarray(sequences)
        _check_sequences(sequences, self.vocab_size, min_length=2)
        length = sequences.shape[1]
        probabilities = np.empty((len(sequences), length - 1))
        alpha, vocab_size = self.smoothing, self.vocab_size
        for k, counts in enumerate(self.counts):
            # The targets at positions first..last have k tokens of context: the
            # longest context serves the rest of the sequence, shorter ones its start.
            first = max(k, 1)
            last = length - 1 if k == self.order - 1 else min(k, length - 1)
            if first > last:
                continue
            codes = _gram_codes(sequences[:, first - k : last + 1], k + 1, vocab_size)
            gram = _lookup(counts.grams, counts.gram_counts, codes)
            context = _lookup(
                counts.contexts, counts.context_counts, codes // vocab_size
            )
            probabilities[:, first - 1 : last] = (gram + alpha) / (
                context + alpha * vocab_size
            )
        return probabilities

    def bits_per_token(
        self, sequences: Integer[np.ndarray, "num_sequences length"]
    ) -> float:
        """The cross-entropy in bits of every token after the first of each sequence,
        averaged over them all: as a causal model's loss on `sequences`.

        **Arguments:**

        - `sequences`: token sequences of at least 2 tokens each.

        **Returns:**

        The mean of `-log2` of [`revdeq.data.NGramModel.probabilities`][].
        """
        return float(-np.mean(np.log2(self.probabilities(sequences))))
