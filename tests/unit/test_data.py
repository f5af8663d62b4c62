"""Byte tokenizer, corpus sources and deterministic microbatches."""

from __future__ import annotations

import pytest
import torch

from swarmnet.config import DataConfig, TrainingConfig
from swarmnet.data.corpus import load_corpus
from swarmnet.data.loader import MicrobatchStream
from swarmnet.data.tokenizer import ByteTokenizer
from swarmnet.errors import ConfigError

pytestmark = pytest.mark.timeout(30)

TRAINING = TrainingConfig(microbatch_size=4, seq_len=16, target_batch_size=8, seed=5)
CORPUS = bytes(range(256)) * 20


def test_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo, wörld\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode(b"\x00\xff") == [0, 255]
    tensor = tok.encode_tensor(text)
    assert tensor.dtype == torch.int64 and tok.decode(tensor) == text
    assert tok.decode([0xFF]) == "\ufffd"


def test_same_index_same_batch_across_streams():
    a = MicrobatchStream(CORPUS, TRAINING, 0.1)
    b = MicrobatchStream(CORPUS, TRAINING, 0.1)
    for i in (0, 1, 17):
        x, y = a.microbatch(i), b.microbatch(i)
        assert x.index == i
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.targets, y.targets)
    assert not torch.equal(a.microbatch(0).tokens, a.microbatch(1).tokens)
    first = [mb for mb, _ in zip(a, range(3))]
    assert [mb.index for mb in first] == [0, 1, 2]
    assert torch.equal(first[2].tokens, b.microbatch(2).tokens)


def test_different_seeds_differ():
    other = TrainingConfig(microbatch_size=4, seq_len=16, target_batch_size=8, seed=6)
    a = MicrobatchStream(CORPUS, TRAINING, 0.1).microbatch(0)
    b = MicrobatchStream(CORPUS, other, 0.1).microbatch(0)
    assert not torch.equal(a.tokens, b.tokens)


def test_targets_are_shifted_tokens():
    corpus = bytes(range(200))  # every window is consecutive, so targets = tokens + 1
    mb = MicrobatchStream(corpus, TRAINING, 0.0).microbatch(3)
    assert mb.tokens.shape == mb.targets.shape == (4, 16)
    assert mb.tokens.dtype == mb.targets.dtype == torch.int64
    assert torch.equal(mb.targets[:, :-1], mb.tokens[:, 1:])
    assert torch.equal(mb.targets, mb.tokens + 1)


def test_training_and_holdout_are_disjoint():
    corpus = bytes(range(200))  # distinct bytes: a token value names its position
    stream = MicrobatchStream(corpus, TRAINING, 0.25)
    holdout_start = 200 - 50
    for i in range(20):
        mb = stream.microbatch(i)
        assert int(mb.targets.max()) < holdout_start
    tokens, targets = stream.eval_batch(3)
    assert tokens.shape == targets.shape == (3, 16)
    assert int(tokens.min()) >= holdout_start
    assert torch.equal(targets, tokens + 1)
    again = stream.eval_batch(3)
    assert torch.equal(tokens, again[0]) and torch.equal(targets, again[1])


def test_short_corpus_raises():
    with pytest.raises(ConfigError):
        MicrobatchStream(b"x" * 16, TRAINING, 0.0)
    with pytest.raises(ConfigError):
        MicrobatchStream(b"x" * 20, TRAINING, 0.5)  # holdout leaves too little training data


def test_folder_source(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bravo")
    (tmp_path / "a.md").write_text("alpha")
    (tmp_path / "sub" / "c.py").write_text("charlie")
    (tmp_path / "README").write_text("readme")
    (tmp_path / "blob").write_bytes(b"\xff\xfe\x00binary")
    (tmp_path / "image.png").write_bytes(b"png")
    cfg = DataConfig(source=str(tmp_path), max_bytes=1000)
    corpus = load_corpus(cfg)
    assert corpus == b"readme\nalpha\nbravo\ncharlie"
    assert load_corpus(cfg) == corpus
    assert load_corpus(DataConfig(source=str(tmp_path), max_bytes=8)) == corpus[:8]


def test_missing_or_empty_folder_raises(tmp_path):
    with pytest.raises(ConfigError):
        load_corpus(DataConfig(source=str(tmp_path / "missing")))
    with pytest.raises(ConfigError):
        load_corpus(DataConfig(source=str(tmp_path)))


def test_stdlib_source_is_deterministic():
    cfg = DataConfig(source="stdlib", max_bytes=20_000)
    corpus = load_corpus(cfg)
    assert len(corpus) == 20_000
    assert load_corpus(cfg) == corpus
    assert b"def " in corpus and b"import " in corpus
