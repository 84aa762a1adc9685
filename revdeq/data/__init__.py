"""Dataset loaders, minibatch iterators, and a count-based n-gram yardstick.

Fashion-MNIST and byte-level text over local files work offline; CIFAR-10 and
Wikitext-103 load through Hugging Face `datasets` and fail loudly when they cannot.
"""

from ._batching import (
    image_batches as image_batches,
    sequence_batches as sequence_batches,
    sequence_windows as sequence_windows,
)
from ._images import (
    load_cifar10 as load_cifar10,
    load_fashion_mnist as load_fashion_mnist,
)
from ._ngram import NGramModel as NGramModel
from ._text import (
    BYTE_VOCAB_SIZE as BYTE_VOCAB_SIZE,
    load_text_corpus as load_text_corpus,
    load_wikitext103 as load_wikitext103,
)
