"""DRACO: gradient coding's FRC groups decoded by majority vote (strategy.vote_f), so that up to
floor(s/2) Byzantine workers per group cannot change the decoded gradient. No Ray: the coded vectors
come from real TrainWorkers' gc_compute in threads; the vote is the driver's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylane.strategies.gradient_coding.draco import vote
from raylane.strategies.gradient_coding.strategy import CodedDriver
from raylane.validation import ConfigError
from raylane.workers.chaos import corruption
from tests.conftest import small_cfg
from tests.multiproc import run_workers_in_threads

N, S, F = 6, 2, 1  # two groups of three copies; one liar per group is outvoted


def _coded_vectors(tmp_path, s: int) -> dict[int, np.ndarray]:
    """Every worker's coded vector for the first job of gc with (N, s), from the workers' own code."""
    cfg = small_cfg(tmp_path, f"cluster.num_workers={N}", "strategy=gradient_coding", f"strategy.s={s}",
                    "strategy.code=frc")
    driver = CodedDriver(cfg.strategy, N)
    tasks = driver.schedule.begin(new_job=True)

    def body(worker):
        (task,) = tasks[worker.rank]
        work = [(0, 0, driver.schedule.parts(worker.rank, task))]
        return worker.strategy.gc_compute(work, driver.schedule.atoms)["vectors"][0]

    return dict(enumerate(run_workers_in_threads(cfg, N, body)))


def test_the_vote_with_a_liar_per_group_and_a_straggler_decodes_the_uncoded_gradient_and_names_the_liars(tmp_path):
    coded = _coded_vectors(tmp_path / "frc", S)
    uncoded = _coded_vectors(tmp_path / "uncoded", 0)  # each worker: its own partition's gradient
    exact = sum(uncoded[i].astype(np.float64) for i in range(N))
    for group in ([0, 1, 2], [3, 4, 5]):  # honest copies of one group: the same bits
        assert all(np.array_equal(coded[group[0]], coded[i]) for i in group)
    copies = dict(coded)
    copies[1] = corruption("sign_flip", 1.0, 0)(torch.from_numpy(coded[1].copy())).numpy()  # liar, group 0
    copies[3] = corruption("scale", 100.0, 0)(torch.from_numpy(coded[3].copy())).numpy()  # liar, group 1
    won = vote(copies, N, S, F)
    assert won is not None and won.disagreeing == [1, 3]
    decoded = sum(copies[w].astype(np.float64) for w in won.winners.values())
    honest = sum(coded[w].astype(np.float64) for w in (0, 3))  # FRC's own decode with no liar
    assert np.array_equal(decoded, honest)
    # the uncoded gradient: the same partitions, each computed alone (FRC computes a group's three as one
    # batch), so they agree to float32 rounding
    np.testing.assert_allclose(decoded, exact, rtol=1e-4, atol=1e-6)
    without_straggler = {k: v for k, v in copies.items() if k != 5}  # group 1: honest 4, liar 3, silent 5
    assert vote(without_straggler, N, S, F) is None  # 1 honest + 1 liar: undecided, wait for 5
    without_straggler[5] = coded[5]
    assert vote(without_straggler, N, S, F).disagreeing == [1, 3]
    skip = {k: v for k, v in coded.items() if k != 2}  # no liar in group 0: its straggler is skipped
    assert vote(skip, N, S, F) is not None


def test_two_agreeing_liars_in_a_group_of_three_are_not_trusted():
    honest, forged = np.ones(4), -np.ones(4)
    assert vote({0: forged, 1: forged, 2: honest}, 3, 2, 1) is not None  # f = 1: the pair wins (f exceeded)
    assert vote({0: forged, 1: forged, 2: honest, 3: honest}, 4, 3, 1) is None  # 2 vs 2: no honest majority


@pytest.mark.parametrize("overrides, key", [
    (["cluster.num_workers=6", "strategy.s=2", "strategy.vote_f=2"], "strategy.vote_f"),
    (["cluster.num_workers=6", "strategy.s=2", "strategy.vote_f=1", "strategy.code=crc"], "strategy.vote_f"),
    (["cluster.num_workers=6", "strategy=sr_sgc", "strategy.vote_f=1"], "strategy.vote_f"),
])
def test_a_vote_that_cannot_outvote_is_a_one_line_error(tmp_path, overrides, key):
    base = [] if any(o.startswith("strategy=") for o in overrides) else ["strategy=gradient_coding"]
    with pytest.raises(ConfigError) as err:
        small_cfg(tmp_path, *base, *overrides)
    assert key in str(err.value) and "\n" not in str(err.value)
