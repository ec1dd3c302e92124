"""Training state that earlier tests could not see change: the EMA arithmetic, the random generators a resume
restores, the BatchNorm buffers the cached-feature pass of accumulation must leave alone, and which epoch best.pt
holds. Each test here failed on a hand-made mutation of the code it guards."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from submit import training
from submit.metrics import METRIC_KEYS
from submit.prepare import prepare
from submit.recipe import load_recipe
from submit.synthetic import make_dataset

TINY = Path(__file__).resolve().parents[1] / "models" / "tiny-test.yaml"
FAST = ["data.workers=0", "train.checkpoint_every=0"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("state_data")
    make_dataset(root / "src", players=30, seqs=2, frames=3, seed=1)
    prepare(root / "src", root / "data", progress=False)
    return root / "data"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(*overrides: str):
    return training.apply_overrides(load_recipe(TINY), [*FAST, *overrides])


def test_ema_update_is_decay_times_average_plus_the_rest_times_live_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = training.EMA(model, decay=0.9)
    for _ in range(2):  # twice: the second update starts from an average that differs from the live weights
        before = {k: v.clone() for k, v in ema.model.state_dict().items()}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(1.0)
            model[1].num_batches_tracked.add_(3)
        live = {k: v.clone() for k, v in model.state_dict().items()}
        ema.update(model)
        for key, value in ema.model.state_dict().items():
            if value.dtype.is_floating_point:
                torch.testing.assert_close(value, 0.9 * before[key] + 0.1 * live[key], rtol=0, atol=1e-6)
            else:  # integer buffers (BatchNorm's batch counter) are copied, not averaged
                assert torch.equal(value, live[key]), key
        assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())  # the live model is untouched
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_resume_restores_every_random_generator(data_dir, tmp_path, monkeypatch):
    """Draws from python, numpy and torch at each step (as dropout or augmentation would) continue after a
    resume exactly where the uninterrupted run had them."""
    draws: list[tuple[float, float, float]] = []
    real = training._Trainer.train_step

    def drawing(self, batch):
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(1))))
        return real(self, batch)

    monkeypatch.setattr(training._Trainer, "train_step", drawing)
    training.train(tiny(), data_dir, tmp_path / "straight", device="cpu", max_steps=3, progress=False)
    straight = list(draws)
    draws.clear()
    training.train(tiny(), data_dir, tmp_path / "resumed", device="cpu", max_steps=2, progress=False)
    training.train(tiny(), data_dir, tmp_path / "resumed", device="cpu", max_steps=3, resume=True, progress=False)
    assert len(straight) == 3 and len(set(straight)) == 3
    assert draws == straight


def test_cached_feature_pass_leaves_batchnorm_buffers_alone(data_dir, tmp_path):
    """With accum_steps > 1 the no-grad pass that caches every micro-batch's features must not move BatchNorm's
    running statistics: after one step they are those of the micro-batches' gradient passes only."""
    recipe = tiny("backbone.name=timm:test_resnet", "train.accum_steps=2", "train.pairs_per_batch=2")
    trainer = training._Trainer(recipe, data_dir, tmp_path, torch.device("cpu"), training.DistInfo())
    trainer.model.train()
    before = {k: v.clone() for k, v in trainer.model.embedder.named_buffers()}
    assert any(k.endswith("running_mean") for k in before)
    batch = next(iter(trainer.loader))
    micro = batch.chunk(2)
    reference = training.copy.deepcopy(trainer.model.embedder).train()
    with torch.no_grad():
        for pairs in micro:  # what the two gradient passes do to the statistics
            reference(torch.cat([pairs[:, 0], pairs[:, 1]]))

    trainer._cached_features(micro)
    for name, value in trainer.model.embedder.named_buffers():
        assert torch.equal(value, before[name]), name
    trainer.train_step(batch)
    expected = dict(reference.named_buffers())
    moved = 0
    for name, value in trainer.model.embedder.named_buffers():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)
        moved += not torch.equal(value, before[name])
    assert moved


def test_best_pt_holds_the_first_epoch_with_the_highest_map(data_dir, tmp_path, monkeypatch):
    maps = iter([0.5, 0.9, 0.9, 0.7])
    monkeypatch.setattr(training, "validate", lambda *args, **kwargs: dict.fromkeys(METRIC_KEYS, next(maps)))
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    real_end = training._Trainer._end_epoch

    def end(self, partial):
        snapshots[self.state.epoch + 1] = {k: v.clone() for k, v in self.model.embedder.state_dict().items()}
        real_end(self, partial)

    monkeypatch.setattr(training._Trainer, "_end_epoch", end)
    out = tmp_path / "run"
    training.train(tiny("train.epochs=4"), data_dir, out, device="cpu", progress=False)
    best = torch.load(out / "best.pt", weights_only=True)
    last = torch.load(out / "last.pt", weights_only=True)
    assert sorted(snapshots) == [1, 2, 3, 4]
    assert best["metrics"]["epoch"] == 2 and best["metrics"]["mAP"] == 0.9
    assert all(torch.equal(v, snapshots[2][k]) for k, v in best["model"].items())
    assert not all(torch.equal(v, snapshots[3][k]) for k, v in best["model"].items())
    assert last["state"]["best_map"] == 0.9 and last["state"]["epoch"] == 4
