"""DiLoCo's fragments, sync schedule and config checks: pure unit tests (no Ray, no processes)."""

import pytest
import torch

from raylane import config
from raylane.strategies.diloco.fragments import SyncSchedule, block_fragments, split_parameters
from raylane.validation import ConfigError
from raylane.workers.models import ModelConfig, build_model

pytestmark = pytest.mark.timeout(60)


def test_strided_fragments_take_every_pth_block():
    assert block_fragments(8, 4, "strided") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert block_fragments(5, 2, "strided") == [[0, 2, 4], [1, 3]]


def test_sequential_fragments_are_contiguous_and_balanced():
    assert block_fragments(8, 4, "sequential") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert block_fragments(5, 2, "sequential") == [[0, 1], [2, 3, 4]]


def test_more_fragments_than_blocks_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"strategy.fragments=3: must be in \[1, 2\]"):
        block_fragments(2, 3, "strided")


def _char_model(n_layer: int) -> torch.nn.Module:
    return build_model(ModelConfig(n_layer=n_layer, d_model=16, n_head=2), 11, 0, 8, 0)


def test_embeddings_join_block0s_fragment_and_final_norm_and_head_the_last_blocks():
    parts = split_parameters(_char_model(4), 4, "strided")
    names = [[n for n, _ in part] for part in parts]
    assert names[0][:2] == ["tok.weight", "pos.weight"]
    assert {n.split(".")[1] for n in names[0][2:]} == {"0"}
    assert names[3][-3:] == ["ln_f.weight", "ln_f.bias", "head.weight"]
    assert all(n.startswith("blocks.1.") for n in names[1])
    seq = [[n for n, _ in part] for part in split_parameters(_char_model(4), 2, "sequential")]
    assert {n.split(".")[1] for n in seq[1] if n.startswith("blocks.")} == {"2", "3"}


def test_fragments_cover_every_parameter_once():
    model = _char_model(4)
    for pattern in ("strided", "sequential"):
        for p in (1, 2, 3, 4):
            got = [id(param) for part in split_parameters(model, p, pattern) for _, param in part]
            assert sorted(got) == sorted(id(q) for q in model.parameters())


def test_a_model_without_blocks_is_one_fragment_only():
    model = torch.nn.Linear(3, 2)
    assert len(split_parameters(model, 1, "strided")[0]) == 2
    with pytest.raises(ConfigError, match="strategy.fragments=2"):
        split_parameters(model, 2, "strided")


@pytest.mark.parametrize("fragments", [1, 2, 4])
@pytest.mark.parametrize("tau", [0, 1, 5])
def test_every_fragment_starts_once_per_h_steps_and_merges_tau_steps_later(fragments, tau):
    h = 8
    sched = SyncSchedule(h, fragments, tau)
    steps = range(1, 6 * h + 1)
    starts = {t: sched.starting(t) for t in steps if sched.starting(t) is not None}
    for t0 in range(1, 5 * h + 1):  # every window of H consecutive steps
        window = [starts[t] for t in range(t0, t0 + h) if t in starts]
        assert sorted(window) == list(range(fragments))
    for p in range(fragments):
        first = p * h // fragments or h
        assert [t for t, q in starts.items() if q == p][:2] == [first, first + h]
    assert all(sched.merge_step(t) == t + tau for t in starts)


def test_several_fragments_are_in_flight_when_tau_exceeds_h_over_p():
    sched = SyncSchedule(8, 4, 5)
    starts = [t for t in range(1, 40) if sched.starting(t) is not None]
    in_flight = max(sum(1 for s in starts if s <= t < s + 5) for t in range(8, 32))
    assert in_flight == 3


@pytest.mark.parametrize("override, key", [
    ("strategy.fragments=3", "strategy.fragments=3"),  # sync_every=2 below
    ("strategy.overlap_steps=2", "strategy.overlap_steps=2"),
    ("strategy.merge_alpha=1.5", "strategy.merge_alpha=1.5"),
    ("strategy.compression.name=powersgd", "strategy.compression.name='powersgd'"),
    ("strategy.compression.zstd_level=3", "strategy.compression.zstd_level=3"),
    ("strategy.fragment_pattern=random", "strategy.fragment_pattern='random'"),
    ("strategy.recover_from=peer", "strategy.recover_from='peer'"),
])
def test_bad_diloco_settings_are_one_line_config_errors(override, key):
    with pytest.raises(ConfigError) as err:
        config.load(["strategy=diloco", "strategy.sync_every=2", override])
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_diloco_presets_load():
    vanilla = config.load(["strategy=diloco"]).strategy
    assert (vanilla.fragments, vanilla.overlap_steps, vanilla.compression.name) == (1, 0, "none")
    streaming = config.load(["strategy=streaming_diloco", "model.n_layer=4", "strategy.fragments=4"]).strategy
    assert (streaming.name, streaming.fragments, streaming.overlap_steps) == ("diloco", 4, 1)
    assert (streaming.compression.name, streaming.compression.format) == ("fp4", "e3m0")
