"""scikit-learn's digits as a raylane dataset, the CNN, and evaluation's accuracy (no Ray)."""

from __future__ import annotations

import pytest
import torch

from raylane import config
from raylane.validation import ConfigError
from raylane.workers.data import DataConfig, build_dataset
from raylane.workers.models import ModelConfig, build_model
from raylane.strategies.base import WorkerStrategy
from raylane.workers.worker import TrainWorker

pytestmark = pytest.mark.timeout(120)


def test_digits_split_is_fixed_and_eval_batches_cover_each_image_once():
    a, b = build_dataset(DataConfig(name="digits", eval_fraction=0.2), 0), build_dataset(DataConfig(name="digits"), 7)
    assert (a.num_train, len(a.eval_y), a.input_dim, a.vocab_size) == (1438, 359, 64, 10)
    assert torch.equal(a.eval_x, build_dataset(DataConfig(name="digits", eval_fraction=0.2), 3).eval_x)
    assert float(a.x.max()) <= 1.0 and b.classification
    seen = torch.cat([a.eval_batch(i, 32)[1] for i in range(12)])
    assert torch.equal(seen, a.eval_y)


def test_cnn_maps_flat_8x8_images_to_10_logits_and_checks_its_input():
    model = build_model(ModelConfig(name="cnn", channels=[4, 8]), 10, 64, 0, seed=0)
    assert model(torch.rand(5, 64)).shape == (5, 10)
    with pytest.raises(ConfigError, match="model.channels"):
        build_model(ModelConfig(name="cnn", channels=[4, 8, 8, 8]), 10, 64, 0, seed=0)
    with pytest.raises(ConfigError, match="model=cnn needs image data"):
        config.load(["model=cnn", "data=synthetic"])


def test_evaluate_reports_correct_predictions_for_classification_data():
    cfg = config.load(["model=cnn", "data=digits", "logging=quiet"])
    w = TrainWorker(cfg, rank=0)

    class Strategy(WorkerStrategy):  # the default view and the worker's own evaluation loop
        pass

    class Comm:
        class stats:
            @staticmethod
            def total():
                return type("T", (), {"bytes_sent": 0, "bytes_recv": 0})()

    w.strategy, w.comm = Strategy(cfg.strategy, None), Comm()
    out = w.evaluate(1)
    correct, samples = out["model/accuracy"]
    assert samples == 359 and 0 <= correct <= samples
    with torch.no_grad():
        assert correct == int((w.model(w.data.eval_x).argmax(-1) == w.data.eval_y).sum())
