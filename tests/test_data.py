import gzip
import pathlib
import re
import sysconfig

import jax.random as jr
import numpy as np
import pytest

import revdeq.data as rd


_FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic number, big-endian dims, payload."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _write_gz(path: pathlib.Path, payload: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(payload)


def _fake_fashion_mnist(root: pathlib.Path) -> dict:
    rng = np.random.default_rng(0)
    data = {}
    for split, n in (("train", 12), ("test", 5)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        images_file, labels_file = _FILES[split]
        _write_gz(root / images_file, _idx_bytes(images))
        _write_gz(root / labels_file, _idx_bytes(labels))
        data[split] = (images, labels)
    return data


def test_fashion_mnist_roundtrip(tmp_path):
    expected = _fake_fashion_mnist(tmp_path)
    data = rd.load_fashion_mnist(tmp_path)
    assert set(data) == {"train", "test"}
    for split, (images, labels) in expected.items():
        got_images, got_labels = data[split]
        assert got_images.dtype == np.uint8 and got_images.shape == images.shape
        assert got_labels.dtype == np.int32
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)


def test_fashion_mnist_env_var(tmp_path, monkeypatch):
    expected = _fake_fashion_mnist(tmp_path)
    monkeypatch.setenv("REVDEQ_FASHION_MNIST", str(tmp_path))
    np.testing.assert_array_equal(
        rd.load_fashion_mnist()["test"][0], expected["test"][0]
    )


def test_fashion_mnist_missing_dir(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="apt-get install dataset-fashion-mnist"
    ):
        rd.load_fashion_mnist(tmp_path / "nowhere")


def test_fashion_mnist_truncated_payload(tmp_path):
    _fake_fashion_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path) as f:
        payload = f.read()
    _write_gz(path, payload[:-100])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*truncated"):
        rd.load_fashion_mnist(tmp_path)


def test_fashion_mnist_truncated_gzip(tmp_path):
    _fake_fashion_mnist(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        rd.load_fashion_mnist(tmp_path)


def test_fashion_mnist_wrong_magic(tmp_path):
    _fake_fashion_mnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    # A 3-d image file where a 1-d label file belongs.
    _write_gz(path, _idx_bytes(np.zeros((12, 28, 28), np.uint8)))
    with pytest.raises(ValueError, match="magic number 0x00000801"):
        rd.load_fashion_mnist(tmp_path)


def test_fashion_mnist_count_mismatch(tmp_path):
    _fake_fashion_mnist(tmp_path)
    _write_gz(tmp_path / "t10k-labels-idx1-ubyte.gz", _idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(ValueError, match="5 images but .* 4 labels"):
        rd.load_fashion_mnist(tmp_path)


@pytest.mark.skipif(
    not _FASHION_MNIST.is_dir(),
    reason=f"{_FASHION_MNIST} missing: apt-get install dataset-fashion-mnist",
)
def test_fashion_mnist_real():
    data = rd.load_fashion_mnist(_FASHION_MNIST)
    (train_images, train_labels), (test_images, test_labels) = (
        data["train"],
        data["test"],
    )
    assert train_images.shape == (60000, 28, 28)
    assert test_images.shape == (10000, 28, 28)
    assert train_labels.shape == (60000,) and test_labels.shape == (10000,)
    assert train_labels.min() == 0 and train_labels.max() == 9
    np.testing.assert_array_equal(np.bincount(train_labels), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(test_labels), np.full(10, 1000))
    assert 0 < train_images.mean() < 255


def test_image_batches():
    n = 10
    # Each image is filled with its own label, so pairing can be checked.
    labels = np.arange(n, dtype=np.int64) * 20
    images = np.broadcast_to(labels[:, None, None], (n, 4, 3)).astype(np.uint8)
    key = jr.PRNGKey(0)
    batches = list(rd.image_batches(images, labels, 3, key=key, drop_last=False))
    assert [len(y) for _, y in batches] == [3, 3, 3, 1]
    for x, y in batches:
        assert x.dtype == np.float32 and x.shape[1:] == (4, 3, 1)
        assert y.dtype == np.int32
        np.testing.assert_array_equal(x[:, 0, 0, 0], y.astype(np.float32) / 255)
    seen = np.concatenate([y for _, y in batches])
    assert sorted(seen) == list(labels) and list(seen) != list(labels)

    again = list(rd.image_batches(images, labels, 3, key=key, drop_last=False))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(batches, again))
    dropped = list(rd.image_batches(images, labels, 3, key=key))
    assert len(dropped) == 3
    resumed = list(rd.image_batches(images, labels, 3, key=key, start=2))
    np.testing.assert_array_equal(resumed[0][1], batches[2][1])
    ordered = list(rd.image_batches(images, labels, 5, shuffle=False))
    np.testing.assert_array_equal(ordered[1][1], labels[5:])


def test_batching_errors():
    images, labels = np.zeros((4, 2, 2), np.uint8), np.zeros(4, np.int32)
    with pytest.raises(ValueError, match="`key` is required"):
        rd.image_batches(images, labels, 2)
    with pytest.raises(ValueError, match="`batch_size`"):
        rd.image_batches(images, labels, 0, key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match="`seq_len`"):
        rd.sequence_batches(labels, 0, 1, key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match="4 images make no batch"):
        rd.image_batches(images, labels, 5, key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match="1 windows of `seq_len \\+ 1`=4 tokens"):
        rd.sequence_batches(np.arange(5), 3, 2, shuffle=False)


def test_sequence_batches():
    # Token values equal positions, so every row shows where its window starts.
    tokens = np.arange(1000, dtype=np.int64)
    seq_len, batch_size = 16, 8
    batches = list(rd.sequence_batches(tokens, seq_len, batch_size, key=jr.PRNGKey(1)))
    num_windows = (len(tokens) - 1) // seq_len
    assert len(batches) == num_windows // batch_size
    for inputs, targets in batches:
        assert inputs.shape == targets.shape == (batch_size, seq_len)
        assert inputs.dtype == targets.dtype == np.int32
        np.testing.assert_array_equal(targets, inputs + 1)
        np.testing.assert_array_equal(inputs, inputs[:, :1] + np.arange(seq_len))
    starts = np.concatenate([inputs[:, 0] for inputs, _ in batches])
    assert np.all(starts % seq_len == 0)
    assert len(set(starts)) == len(starts) and list(starts) != sorted(starts)

    ordered = next(rd.sequence_batches(tokens, seq_len, 2, shuffle=False))
    np.testing.assert_array_equal(ordered[0], tokens[: 2 * seq_len].reshape(2, seq_len))
    resumed = next(
        rd.sequence_batches(tokens, seq_len, batch_size, key=jr.PRNGKey(1), start=1)
    )
    np.testing.assert_array_equal(resumed[0], batches[1][0])


def test_sequence_windows_strided():
    # Token values equal positions: 999 // 10 = 99 windows of 11 tokens.
    tokens = np.arange(1000)
    windows = rd.sequence_windows(tokens, 10, 5)
    # The middle window of each fifth of the 99: (2i + 1) * 99 // 10.
    np.testing.assert_array_equal(windows[:, 0], [90, 290, 490, 690, 890])
    # Spread over the stream: within half a stride (~100 tokens) of either end.
    assert windows[0, 0] < 100 and windows[-1, -1] > 999 - 100
    np.testing.assert_array_equal(windows, windows[:, :1] + np.arange(11))
    np.testing.assert_array_equal(rd.sequence_windows(tokens, 10, 5), windows)
    every = rd.sequence_windows(tokens, 10)
    assert every.shape == (99, 11)
    np.testing.assert_array_equal(every[:, 0], np.arange(0, 990, 10))
    np.testing.assert_array_equal(rd.sequence_windows(tokens, 10, 500), every)
    one = rd.sequence_windows(np.arange(12), 5, 1)  # Of 2 windows, the second.
    np.testing.assert_array_equal(one, [np.arange(5, 11)])


def test_sequence_windows_random():
    tokens = np.arange(1000)
    windows = rd.sequence_windows(tokens, 10, 30, key=jr.key(0))
    starts = windows[:, 0]
    assert windows.shape == (30, 11)
    np.testing.assert_array_equal(windows, starts[:, None] + np.arange(11))
    assert np.all(starts % 10 == 0) and np.all(np.diff(starts) > 0)
    assert starts.max() + 10 < 1000
    again = rd.sequence_windows(tokens, 10, 30, key=jr.key(0))
    other = rd.sequence_windows(tokens, 10, 30, key=jr.key(1))
    np.testing.assert_array_equal(again, windows)
    assert not np.array_equal(other, windows)
    # 30 of 99 windows drawn uniformly reach beyond the first and last thirds.
    assert starts.min() < 330 and starts.max() > 660

    batches = list(rd.sequence_batches(windows, 10, 8, key=jr.key(2)))
    assert len(batches) == 3
    seen = np.concatenate([inputs[:, 0] for inputs, _ in batches])
    assert set(seen) < set(starts) and len(set(seen)) == 24
    for inputs, targets in batches:
        assert inputs.dtype == np.int32 and inputs.shape == (8, 10)
        np.testing.assert_array_equal(targets, inputs + 1)
    ordered = list(rd.sequence_batches(windows, 10, 8, shuffle=False, drop_last=False))
    np.testing.assert_array_equal(
        np.concatenate([x for x, _ in ordered]), windows[:, :-1]
    )


def test_sequence_windows_errors():
    with pytest.raises(ValueError, match="`num_windows`"):
        rd.sequence_windows(np.arange(100), 10, 0)
    with pytest.raises(ValueError, match="fewer than one window"):
        rd.sequence_windows(np.arange(10), 10)
    with pytest.raises(ValueError, match="`seq_len` must be 10"):
        rd.sequence_batches(np.zeros((3, 11), np.int32), 12, 2, shuffle=False)


def test_evaluation_windows_avoid_training(tmp_path):
    """Windows stay within their split: train bytes lie in 0..99, validation bytes in
    100..149 and test bytes in 150..199, so a byte shows where it came from."""
    rng = np.random.default_rng(0)
    parts = [rng.integers(low, high, size) for low, high, size in
             ((0, 100, 8000), (100, 150, 1000), (150, 200, 1000))]  # fmt: skip
    path = tmp_path / "corpus.txt"
    path.write_bytes(np.concatenate(parts).astype(np.uint8).tobytes())
    corpus = rd.load_text_corpus(path, validation_fraction=0.1, test_fraction=0.1)
    train = rd.sequence_windows(corpus["train"], 16, 200, key=jr.key(0))
    assert train.max() < 100
    for split, (low, high) in (("validation", (100, 150)), ("test", (150, 200))):
        windows = rd.sequence_windows(corpus[split], 16, 20)
        assert low <= windows.min() and windows.max() < high


# "abab" over the vocabulary a, b, c = 0, 1, 2, with add-1/2 smoothing (V = 3):
# unigrams   a: 2, b: 2 of 4         p(a) = p(b) = 2.5 / 5.5 = 5/11, p(c) = 1/11
# bigrams    ab: 2, ba: 1            p(b | a) = 2.5 / 3.5 = 5/7, p(c | a) = 1/7
#            contexts a: 2, b: 1     p(a | b) = 1.5 / 2.5 = 3/5, p(b | b) = 1/5
# trigrams   aba: 1, bab: 1          p(a | ab) = 1.5 / 2.5 = 3/5, p(c | ba) = 1/5
# 4-grams    abab: 1                 p(c | aba) = 0.5 / 2.5 = 1/5
# An unseen context, e.g. c or ca, gives 0.5 / 1.5 = 1/3 to every token.
_ABAB = np.array([[0, 1, 0, 1]])
_EVAL = np.array([[0, 1, 0, 2], [2, 0, 1, 1]])  # "abac", "cabb"
_EXPECTED = {
    1: [[5 / 11, 5 / 11, 1 / 11], [5 / 11, 5 / 11, 5 / 11]],
    2: [[5 / 7, 3 / 5, 1 / 7], [1 / 3, 5 / 7, 1 / 5]],
    # The first target has one token of context, the second two.
    3: [[5 / 7, 3 / 5, 1 / 5], [1 / 3, 1 / 3, 1 / 5]],
    4: [[5 / 7, 3 / 5, 1 / 5], [1 / 3, 1 / 3, 1 / 3]],
}


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ngram_by_hand(order):
    model = rd.NGramModel(_ABAB, order=order, vocab_size=3)
    expected = np.array(_EXPECTED[order])
    np.testing.assert_allclose(model.probabilities(_EVAL), expected, rtol=1e-12)
    bits = -np.mean(np.log2(expected))
    np.testing.assert_allclose(model.bits_per_token(_EVAL), bits, rtol=1e-12)


def test_ngram_counts_stay_within_sequences():
    # "ab" twice: the bigram ba never occurs, and no bigram starts with b.
    model = rd.NGramModel(np.array([[0, 1], [0, 1]]), order=2, vocab_size=3)
    np.testing.assert_allclose(
        model.probabilities(np.array([[0, 1, 0]])), [[5 / 7, 1 / 3]]
    )
    # Counted as one stream "abab", it has: p(a | b) = 3/5.
    stream = rd.NGramModel(_ABAB, order=2, vocab_size=3)
    np.testing.assert_allclose(stream.probabilities(np.array([[1, 0]])), [[3 / 5]])


def test_ngram_errors():
    with pytest.raises(ValueError, match="`order`"):
        rd.NGramModel(_ABAB, order=0, vocab_size=3)
    with pytest.raises(ValueError, match="`smoothing`"):
        rd.NGramModel(_ABAB, order=2, vocab_size=3, smoothing=0.0)
    with pytest.raises(ValueError, match="int64 codes"):
        rd.NGramModel(_ABAB, order=4, vocab_size=2**16)
    with pytest.raises(ValueError, match="outside 0..0"):
        rd.NGramModel(_ABAB, order=2, vocab_size=1)
    with pytest.raises(ValueError, match="at least 5 tokens"):
        rd.NGramModel(_ABAB, order=5, vocab_size=3)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        rd.NGramModel(_ABAB, order=2, vocab_size=3).probabilities(_ABAB[:, :1])


def test_text_corpus_stdlib():
    max_bytes = 300_000
    corpus = rd.load_text_corpus(max_bytes=max_bytes)
    again = rd.load_text_corpus(max_bytes=max_bytes)
    assert set(corpus) == {"train", "validation", "test"}
    assert sum(len(split) for split in corpus.values()) == max_bytes
    assert len(corpus["validation"]) == len(corpus["test"]) == max_bytes // 20
    for name, split in corpus.items():
        assert split.dtype == np.uint8 and split.ndim == 1
        np.testing.assert_array_equal(split, again[name])
    text = corpus["train"].tobytes()
    assert b"def " in text and b"import " in text
    assert rd.BYTE_VOCAB_SIZE == 256


def test_text_corpus_files(tmp_path):
    parts = [b"first file\n" * 30, "second: caf\u00e9\n".encode() * 30]
    paths = []
    for i, part in enumerate(parts):
        paths.append(tmp_path / f"{i}.txt")
        paths[-1].write_bytes(part)
    corpus = rd.load_text_corpus(paths, validation_fraction=0.1, test_fraction=0.2)
    single = rd.load_text_corpus(str(paths[0]))
    assert b"".join(part.tobytes() for part in single.values()) == parts[0]
    joined = np.concatenate([corpus["train"], corpus["validation"], corpus["test"]])
    assert joined.tobytes() == b"".join(parts)
    total = len(joined)
    assert len(corpus["validation"]) == int(0.1 * total)
    assert len(corpus["test"]) == int(0.2 * total)

    with pytest.raises(FileNotFoundError, match="missing.txt"):
        rd.load_text_corpus([tmp_path / "missing.txt"])
    with pytest.raises(ValueError, match="too small"):
        rd.load_text_corpus(paths, max_bytes=10)
    with pytest.raises(ValueError, match="`test_fraction`"):
        rd.load_text_corpus(paths, test_fraction=1.5)


@pytest.fixture
def offline_hub(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'uoft-cs/cifar10' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


@pytest.mark.parametrize("loader", [rd.load_cifar10, rd.load_wikitext103])
def test_hub_loaders_fail_clearly_offline(offline_hub, loader):
    with pytest.raises(RuntimeError, match="HF_DATASETS_OFFLINE=1") as info:
        loader()
    assert "huggingface.co" in str(info.value)
    assert isinstance(info.value.__cause__, ConnectionError)


def test_hub_loaders_convert(monkeypatch):
    datasets = pytest.importorskip("datasets")
    PIL_Image = pytest.importorskip("PIL.Image")
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), np.uint8)
    image_split = datasets.Dataset.from_dict(
        {"img": [PIL_Image.fromarray(image) for image in images], "label": [4, 0, 9]},
        features=datasets.Features(
            {"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}
        ),
    )
    text_split = datasets.Dataset.from_dict(
        {"text": [" = Title = \n", "", " caf\u00e9\n"]}
    )
    fakes = {
        "uoft-cs/cifar10": datasets.DatasetDict(train=image_split, test=image_split),
        "Salesforce/wikitext": datasets.DatasetDict(
            train=text_split, validation=text_split, test=text_split
        ),
    }
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None: fakes[path])

    cifar = rd.load_cifar10()
    for split in ("train", "test"):
        got_images, got_labels = cifar[split]
        assert got_images.dtype == np.uint8 and got_labels.dtype == np.int32
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, [4, 0, 9])

    wikitext = rd.load_wikitext103()
    assert set(wikitext) == {"train", "validation", "test"}
    assert wikitext["test"].dtype == np.uint8
    assert wikitext["test"].tobytes().decode() == " = Title = \n caf\u00e9\n"


def test_text_corpus_default_is_sorted_stdlib(tmp_path, monkeypatch):
    files = {
        "b.py": b"b" * 40,
        "a/z.py": b"z" * 40,
        "a/notes.txt": b"x" * 40,
        "site-packages/pkg.py": b"s" * 40,
        "A.py": b"A" * 40,
    }
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    paths = {**sysconfig.get_paths(), "stdlib": str(tmp_path)}
    monkeypatch.setattr(sysconfig, "get_paths", lambda: paths)
    corpus = rd.load_text_corpus(test_fraction=0.25, validation_fraction=0.25)
    joined = b"".join(
        corpus[split].tobytes() for split in ("train", "validation", "test")
    )
    assert joined == b"A" * 40 + b"z" * 40 + b"b" * 40
