"""Data: the default corpus, deterministic global sampling, shards that concatenate to the global batch."""

import pytest
import torch

from raylane.workers.data import CharCorpus, DataConfig, GlobalSampler, build_dataset, default_text

pytestmark = pytest.mark.timeout(60)


def test_default_corpus_is_pydoc_topics_english_text():
    text = default_text()
    assert len(text) > 100_000 and "the" in text


def test_char_corpus_targets_are_inputs_shifted_by_one():
    corpus = CharCorpus("abcdefghij" * 50, seq_len=8, eval_fraction=0.2)
    x, y = corpus.train_batch(torch.tensor([0, 3]))
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert corpus.decode(x[0].tolist()) == "abcdefgh"


def test_sampler_is_deterministic_and_each_epoch_is_a_permutation():
    a, b = GlobalSampler(100, seed=7), GlobalSampler(100, seed=7)
    assert torch.equal(a.indices(0, 250), b.indices(0, 250))
    first = a.indices(0, 100)
    assert sorted(first.tolist()) == list(range(100))
    assert not torch.equal(first, a.indices(100, 100))


def test_rank_slices_concatenate_to_the_global_batch():
    sampler, world, bs, offset = GlobalSampler(1000, seed=1), 4, 8, 96
    shards = [sampler.indices(offset + r * bs, bs) for r in range(world)]
    assert torch.equal(torch.cat(shards), sampler.indices(offset, world * bs))


def test_data_path_reads_a_text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("hello world, " * 200)
    data = build_dataset(DataConfig(path=str(path), seq_len=16), seed=0)
    assert data.vocab_size == len(set("hello world, "))


def test_synthetic_labels_are_learnable_and_seeded():
    cfg = DataConfig(name="synthetic", num_samples=512)
    a, b = build_dataset(cfg, seed=3), build_dataset(cfg, seed=3)
    assert torch.equal(a.train_batch(torch.arange(10))[1], b.train_batch(torch.arange(10))[1])
    assert len(set(a.train_batch(torch.arange(512))[1].tolist())) > 2
