"""Multirun sweeps make one run dir per job; the report plots every run from metrics.jsonl alone."""

import re

import pytest
import yaml

from raylane import report, train
from tests.conftest import SMALL

pytestmark = [pytest.mark.timeout(300), pytest.mark.ray]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("sweep")
    from raylane.orchestrator.coordinator import run

    jobs = train.build_jobs([*SMALL, f"run.root={root}", "train.steps=4", "cluster.num_workers=2",
                             "optim.lr=1e-3,2e-3"], multirun=True)
    for cfg in jobs:
        run(cfg)
    return root, jobs


def test_multirun_of_two_values_gives_two_run_dirs_with_different_configs(two_runs):
    root, jobs = two_runs
    dirs = sorted(p for p in root.iterdir() if p.is_dir())
    assert [d.name for d in dirs] == ["ddp-char_transformer__optim.lr=0.001", "ddp-char_transformer__optim.lr=0.002"]
    lrs = [yaml.safe_load((d / "config.yaml").read_text())["optim"]["lr"] for d in dirs]
    assert lrs == [1e-3, 2e-3]
    assert {j.logging.group for j in jobs} == {"ddp-char_transformer"}


def test_report_has_one_plot_per_metric_with_both_runs(two_runs, tmp_path):
    root, _ = two_runs
    dirs = sorted(p for p in root.iterdir() if p.is_dir())
    out = tmp_path / "report.html"
    assert report.main([*map(str, dirs), "-o", str(out)]) == 0
    page = out.read_text()
    figures = re.findall(r'<figure class="plot" data-metric="([^"]+)">(.*?)</figure>', page, re.S)
    assert [t for t, _ in figures] == [p[0] for p in report.PLOTS]
    for _, svg in figures:
        for d in dirs:
            assert d.name in svg  # each run is a labelled line in every plot


def test_report_on_dir_without_metrics_is_a_one_line_error(tmp_path, capsys):
    assert report.main([str(tmp_path), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.jsonl" in err[0] and str(tmp_path) in err[0]
    assert not (tmp_path / "r.html").exists()
