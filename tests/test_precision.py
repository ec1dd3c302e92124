"""Every precision path of training and embedding on CPU: fp32, bf16 autocast, fp16 autocast with the gradient
scaler (unscale before clipping, skipped steps on inf, scaler state through checkpoints and resume). The CUDA
variants are marked `cuda` and skip here with a reason; scripts/gpu_check.sh runs them on a GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from submit import training
from submit.device import amp_dtype, autocast, needs_scaler, precision_note
from submit.distributed import DistInfo
from submit.embedding import cache_key, embed_views
from submit.manifest import read_manifest
from submit.recipe import TTASpec, load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny-test.yaml"
CPU = torch.device("cpu")
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False); "
                                                     "scripts/gpu_check.sh runs these on one")


def tiny(precision: str, *overrides: str):
    """The tiny recipe in `precision`, no mid-epoch checkpoints, no loader workers."""
    return training.apply_overrides(load_recipe(TINY), ["data.workers=0", "train.checkpoint_every=0",
                                                        f"train.precision={precision}", *overrides])


def trainer(recipe, data_dir: Path, out: Path, device: torch.device = CPU) -> training._Trainer:
    return training._Trainer(recipe, data_dir, out, device, DistInfo())


def test_amp_dtype_honours_bf16_fp16_on_cpu_and_auto_stays_fp32(monkeypatch):
    assert amp_dtype(CPU, "auto") is None and amp_dtype(CPU, "fp32") is None
    assert amp_dtype(CPU, "bf16") == torch.bfloat16 and amp_dtype(CPU, "fp16") == torch.float16
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert amp_dtype(cuda, "auto") == torch.bfloat16 and amp_dtype(cuda, "fp32") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert amp_dtype(cuda, "auto") == torch.float16 and needs_scaler(cuda, "auto")
    assert needs_scaler(CPU, "fp16") and not needs_scaler(CPU, "bf16") and not needs_scaler(CPU, "auto")
    layer = torch.nn.Linear(4, 4)
    for precision, dtype in (("auto", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with autocast(CPU, precision):
            assert layer(torch.randn(2, 4)).dtype == dtype


def cpu_support(monkeypatch, bf16: bool, amx: bool, amx_fp16: bool) -> None:
    """Pretend this CPU has (or lacks) native bf16 (AVX512-BF16), AMX tiles and AMX-FP16."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: amx_fp16)


def test_precision_note_warns_only_where_a_cpu_emulates_half_precision(monkeypatch):
    cpu_support(monkeypatch, bf16=False, amx=False, amx_fp16=False)
    for precision in ("bf16", "fp16"):
        note = precision_note(CPU, precision)
        assert note is not None and note.startswith(f"train.precision {precision}: this CPU lacks")
        assert "train.precision=fp32" in note
    assert precision_note(CPU, "fp32") is None and precision_note(CPU, "auto") is None
    assert precision_note(torch.device("cuda"), "bf16") is None  # a device object only
    cpu_support(monkeypatch, bf16=True, amx=False, amx_fp16=False)
    assert precision_note(CPU, "bf16") is None and precision_note(CPU, "fp16") is not None
    cpu_support(monkeypatch, bf16=False, amx=True, amx_fp16=True)
    assert precision_note(CPU, "bf16") is None and precision_note(CPU, "fp16") is None


def test_training_logs_the_emulated_precision_note(monkeypatch, data_dir, tmp_path, caplog):
    cpu_support(monkeypatch, bf16=False, amx=False, amx_fp16=False)
    with caplog.at_level("INFO", logger="submit.training"):
        training.train(tiny("bf16"), data_dir, tmp_path / "run", max_steps=1, progress=False, device="cpu")
    assert any("train.precision bf16: this CPU lacks" in r.getMessage() for r in caplog.records)
    caplog.clear()
    cpu_support(monkeypatch, bf16=True, amx=False, amx_fp16=False)
    with caplog.at_level("INFO", logger="submit.training"):
        training.train(tiny("bf16"), data_dir, tmp_path / "run2", max_steps=1, progress=False, device="cpu")
    assert caplog.records and not any("this CPU lacks" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_each_precision_trains_resumes_and_moves_weights(precision, data_dir, tmp_path):
    recipe = tiny(precision, "train.grad_clip=1.0")
    run = trainer(recipe, data_dir, tmp_path / "run")
    start = {k: v.clone() for k, v in run.train_step.model.embedder.state_dict().items()}
    assert run.train_step.scaler.is_enabled() == (precision == "fp16")
    assert run.loader.pin_memory is False  # pinned memory needs CUDA: False on CPU, True on CUDA (cuda test)
    result = training.train(recipe, data_dir, tmp_path / "run", max_steps=3, progress=False, device="cpu")
    assert result["steps"] == 3 and np.isfinite(result["last"]["loss"])
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    moved = [k for k, v in ckpt["model"].items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert len(moved) > len(start) // 2, "most weights should have moved"
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    if precision == "fp16":
        assert ckpt["scaler"]["scale"] > 0 and set(ckpt["scaler"]) >= {"scale", "_growth_tracker"}
    else:
        assert ckpt["scaler"] == {}
    again = training.train(recipe, data_dir, tmp_path / "run", resume=True, max_steps=5, progress=False,
                           device="cpu")
    assert again["steps"] == 5 and np.isfinite(again["last"]["loss"])


def test_fp16_scaler_state_round_trips_through_resume(data_dir, tmp_path):
    recipe = tiny("fp16")
    training.train(recipe, data_dir, tmp_path / "run", max_steps=2, progress=False, device="cpu")
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["scaler"]
    saved["scale"] = 1024.0  # a value no fresh scaler has: only a restore can produce it
    saved["_growth_tracker"] = 7
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    ckpt["scaler"] = saved
    training.save_atomic(ckpt, tmp_path / "run" / "last.pt")
    run = trainer(recipe, data_dir, tmp_path / "run")
    run.resume(tmp_path / "run" / "last.pt")
    state = run.train_step.scaler.state_dict()
    assert state["scale"] == 1024.0 and state["_growth_tracker"] == 7


def _one_batch(run: training._Trainer) -> torch.Tensor:
    run.sampler.set_epoch(0)
    return next(iter(run.loader))


def test_fp16_inf_gradient_skips_the_step_and_backs_off_the_scale(data_dir, tmp_path):
    run = trainer(tiny("fp16", "train.grad_clip=1.0", "train.ema_decay=0.5"), data_dir, tmp_path / "run")
    step = run.train_step
    before = {k: v.clone() for k, v in step.model.state_dict().items()}
    scale = step.scaler.get_scale()
    step.accumulate_gradients(_one_batch(run))
    next(p for p in step.model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
    step.apply_gradients()
    assert all(torch.equal(v, before[k]) for k, v in step.model.state_dict().items()), "the step must be skipped"
    assert step.scaler.get_scale() == scale * step.scaler.get_backoff_factor()
    assert not step.optimizer.state, "AdamW must not have stepped"
    step.accumulate_gradients(_one_batch(run))  # the next finite step goes through
    step.apply_gradients()
    assert any(not torch.equal(v, before[k]) for k, v in step.model.state_dict().items())


def test_fp16_unscales_before_clipping(data_dir, tmp_path, monkeypatch):
    seen: list[float] = []
    original = torch.nn.utils.clip_grad_norm_

    def recording(params, max_norm, *args, **kwargs):
        params = list(params)
        seen.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))))
        return original(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    run = trainer(tiny("fp16", "train.grad_clip=1e-6"), data_dir, tmp_path / "run")
    step = run.train_step
    step.accumulate_gradients(_one_batch(run))
    scaled = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in step.model.parameters()
                                                          if p.grad is not None])))
    step.apply_gradients()
    assert seen and seen[0] == pytest.approx(scaled / step.scaler.get_scale(), rel=1e-3)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_accumulation_and_grad_checkpointing_under_autocast(precision, data_dir, tmp_path):
    recipe = tiny(precision, "train.accum_steps=2", "train.pairs_per_batch=2", "train.grad_checkpointing=true")
    result = training.train(recipe, data_dir, tmp_path / "run", max_steps=2, progress=False, device="cpu")
    assert result["steps"] == 2 and np.isfinite(result["last"]["loss"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_embedding_under_autocast_returns_float32_unit_features(precision, data_dir):
    from submit.backbones import build_embedder

    recipe = load_recipe(TINY)
    torch.manual_seed(0)
    model = build_embedder(recipe.backbone)
    rows = read_manifest(data_dir).head(12)
    views = [(1.0, False), (1.0, True)]
    full = embed_views(model, data_dir, rows, views, batch_size=8, device="cpu", workers=0, precision="fp32",
                       progress=False)
    half = embed_views(model, data_dir, rows, views, batch_size=8, device="cpu", workers=0, precision=precision,
                       progress=False)
    assert half.dtype == np.float32 and np.allclose(np.linalg.norm(half, axis=1), 1.0, atol=1e-5)
    assert (half * full).sum(axis=1).min() > 0.98  # the same features up to half-precision rounding
    valid = embed_views(model, data_dir, rows, training.IDENTITY_VIEW, batch_size=8, device=CPU, workers=0,
                        precision=precision, progress=False, in_training=True)  # what validation embeds
    assert valid.dtype == np.float32 and valid.shape == (12, model.embed_dim)
    tta = TTASpec(hflip=True)
    assert cache_key("x", tta, rows, model, amp_dtype(CPU, precision)) != cache_key("x", tta, rows, model, None)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_amp_trains_and_resumes(precision, data_dir, tmp_path):
    recipe = tiny(precision, "train.grad_clip=1.0")
    run = trainer(recipe, data_dir, tmp_path / "probe", torch.device("cuda"))
    assert run.loader.pin_memory is True and run.train_step.scaler.is_enabled() == (precision == "fp16")
    del run
    result = training.train(recipe, data_dir, tmp_path / "run", max_steps=3, progress=False, device="cuda")
    assert result["steps"] == 3 and np.isfinite(result["last"]["loss"])
    again = training.train(recipe, data_dir, tmp_path / "run", resume=True, max_steps=5, progress=False,
                           device="cuda")
    assert again["steps"] == 5 and np.isfinite(again["last"]["loss"])
    if precision == "fp16":
        assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["scaler"]["scale"] > 0


@pytest.mark.cuda
@needs_cuda
def test_cuda_embedding_matches_cpu(data_dir):
    from submit.backbones import build_embedder

    torch.manual_seed(0)
    model = build_embedder(load_recipe(TINY).backbone)
    rows = read_manifest(data_dir).head(16)
    views = [(1.0, False), (1.0, True)]
    cpu = embed_views(model, data_dir, rows, views, batch_size=8, device="cpu", workers=0, progress=False)
    for precision in ("fp32", "auto", "fp16"):
        gpu = embed_views(model, data_dir, rows, views, batch_size=8, device="cuda", workers=1, precision=precision,
                          progress=False)
        assert gpu.dtype == np.float32 and (gpu * cpu).sum(axis=1).min() > 0.98, precision
