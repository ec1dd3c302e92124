"""Losses against hand computations in numpy; label smoothing; the learnable temperature gets gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from submit.losses import InfoNCELoss, LogitScale, TripletLoss, build_loss

A = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]])
P = np.array([[2.0, 0.2], [0.5, 0.5], [-0.1, 1.0]])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _smoothed_ce(logits: np.ndarray, eps: float) -> float:
    """Cross-entropy with targets (1 - eps) on the diagonal plus eps / C spread over all classes."""
    c = logits.shape[1]
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    per_row = -(1 - eps) * np.diag(log_p) - eps / c * log_p.sum(axis=1)
    return float(per_row.mean())


def test_infonce_matches_hand_computation():
    scale, eps = 10.0, 0.1
    logits = scale * _unit(A) @ _unit(P).T
    expected = (_smoothed_ce(logits, eps) + _smoothed_ce(logits.T, eps)) / 2
    got = InfoNCELoss(eps)(torch.tensor(A), torch.tensor(P), torch.tensor(scale))
    assert abs(got.item() - expected) < 1e-6


def test_infonce_on_orthogonal_pairs_is_the_smoothing_floor():
    """Perfect matches at a huge scale: eps=0 gives ~0, eps=0.1 gives the smoothing term eps*(C-1)/C*scale."""
    x = torch.eye(3)
    assert InfoNCELoss(0.0)(x, x, torch.tensor(50.0)).item() < 1e-6
    floor = InfoNCELoss(0.1)(x, x, torch.tensor(50.0)).item()
    assert abs(floor - 0.1 * 2 / 3 * 50.0) < 1e-3


def test_infonce_is_symmetric_in_its_inputs_and_label_smoothing_changes_it():
    a, p, s = torch.tensor(A), torch.tensor(P), torch.tensor(5.0)
    assert torch.allclose(InfoNCELoss(0.1)(a, p, s), InfoNCELoss(0.1)(p, a, s))
    assert not torch.allclose(InfoNCELoss(0.1)(a, p, s), InfoNCELoss(0.0)(a, p, s))


def test_gradient_flows_to_logit_scale_and_features():
    temp = LogitScale(1 / 0.07)
    assert abs(temp().item() - 1 / 0.07) < 1e-4
    a = torch.tensor(A, dtype=torch.float32, requires_grad=True)
    loss = InfoNCELoss(0.1)(a, torch.tensor(P, dtype=torch.float32), temp())
    loss.backward()
    assert temp.log_scale.grad is not None and temp.log_scale.grad.abs().item() > 0
    assert a.grad is not None and a.grad.abs().sum().item() > 0


def test_logit_scale_frozen_and_capped():
    assert not LogitScale(100.0, learn=False).log_scale.requires_grad
    assert LogitScale(100.0, max_scale=50.0)().item() == 50.0
    assert abs(LogitScale(100.0)().item() - 100.0) < 1e-3  # not clamped by default


def test_triplet_matches_hand_computation():
    x = _unit(np.concatenate([A, P]))
    d = np.sqrt(np.maximum(((x[:, None] - x[None]) ** 2).sum(-1), 1e-12))
    labels = np.array([0, 1, 2, 0, 1, 2])
    same = labels[:, None] == labels[None]
    pos = np.where(same, d, -np.inf).max(1)
    neg = np.where(same, np.inf, d).min(1)
    expected = np.maximum(pos - neg + 1.0, 0).mean()
    got = TripletLoss(1.0)(torch.tensor(A), torch.tensor(P))
    assert expected > 0 and abs(got.item() - expected) < 1e-6


def test_build_loss_names():
    assert isinstance(build_loss("infonce"), InfoNCELoss)
    assert isinstance(build_loss("triplet", margin=0.5), TripletLoss)
    assert math.isclose(build_loss("infonce", label_smoothing=0.2).label_smoothing, 0.2)


def test_loss_registry_drives_recipe_validation_and_the_trainer(monkeypatch):
    """`LOSSES` is the one list: a recipe accepts exactly its names, and a loss registered at test time
    (one line) is accepted by `train.loss` and built by `build_loss`."""
    from submit import config
    from submit.errors import SubmitError
    from submit.losses import LOSSES, Loss
    from submit.recipe import Recipe, TrainSpec

    base = {"name": "r", "backbone": {"name": "timm:x"}}
    assert set(LOSSES) == {"infonce", "triplet"}
    assert LOSSES["infonce"].temperature and not LOSSES["triplet"].temperature
    assert config.from_mapping(Recipe, {**base, "train": {"loss": "triplet"}}, "r.yaml").train.loss == "triplet"
    with pytest.raises(SubmitError, match=r"^r\.yaml: key 'train\.loss': expected one of \['infonce', 'triplet'\], "
                                          r"got 'arcface'$"):
        config.from_mapping(Recipe, {**base, "train": {"loss": "arcface"}}, "r.yaml")
    monkeypatch.setitem(LOSSES, "arcface", Loss(lambda t: TripletLoss(t.triplet_margin * 2), temperature=False))
    recipe = config.from_mapping(Recipe, {**base, "train": {"loss": "arcface"}}, "r.yaml")
    assert isinstance(build_loss(recipe.train.loss, margin=0.25), TripletLoss)
    assert build_loss("arcface", margin=0.25).margin == 0.5
    assert TrainSpec().loss == "infonce"
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        build_loss("nope")
