"""Pre-flight (`train RECIPE --dry-run`): real steps of the tiny recipe on random crops, nothing written,
the wall-time estimate from DATA_DIR, the memory verdict and advice, and one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from submit import training
from submit.cli import main
from submit.distributed import DistInfo
from submit.errors import SubmitError
from submit.preflight import GIB, Preflight, _advice, dry_run
from submit.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny-test.yaml"


def tiny(*overrides: str):
    return training.apply_overrides(load_recipe(TINY), list(overrides))


def test_dry_run_measures_the_tiny_recipe(data_dir):
    result = dry_run(tiny(), device="cpu", steps=2, data_dir=data_dir)
    assert isinstance(result, Preflight) and result.recipe == "tiny-test" and result.weights == "random"
    assert result.params > 10_000 and result.trainable == result.params
    assert result.peak_memory > result.static_memory > 4 * result.params  # fp32 weights + grads + AdamW
    assert result.seconds_per_step > 0 and result.images_per_s == pytest.approx(8 / result.seconds_per_step)
    assert result.precision == "fp32" and result.fits is None and result.advice == ()
    loop = training._Trainer(tiny(), data_dir, data_dir / "unused", torch.device("cpu"), DistInfo())
    assert result.total_steps == sum(loop.steps_per_epoch) > 0  # the training loop's own count
    assert result.estimated_seconds == pytest.approx(result.total_steps * result.seconds_per_step)


@pytest.mark.parametrize("precision, dtype", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_dry_run_uses_precision_accumulation_and_checkpointing(precision, dtype):
    recipe = tiny(f"train.precision={precision}", "train.accum_steps=2", "train.grad_checkpointing=true",
                  "train.grad_clip=1.0", "train.ema_decay=0.9")
    result = dry_run(recipe, device="cpu", steps=1)
    assert result.precision == dtype and result.accum_steps == 2 and result.grad_checkpointing
    assert result.images_per_s == pytest.approx(16 / result.seconds_per_step)
    assert any("one step timed" in n for n in result.notes)


def test_memory_verdict_and_advice():
    roomy = dry_run(tiny(), device="cpu", steps=1, memory_gib=1e5)
    assert roomy.fits is True and roomy.advice == () and roomy.needed_memory == roomy.peak_memory  # CPU: the peak
    tight = dry_run(tiny(), device="cpu", steps=1, memory_gib=0.001)
    assert tight.fits is False and "no batch change fits" in tight.advice[0]
    recipe = tiny("train.pairs_per_batch=16")
    advice = _advice(recipe, peak=10 * GIB, static=1 * GIB, before=1 * GIB, budget=int(5.5 * GIB))
    assert advice[0].startswith("--set train.pairs_per_batch=4 --set train.accum_steps=4")  # 1 + 1 + 8/4 GiB
    assert "grad_checkpointing=true" in advice[1]


def test_uncached_weights_build_random_with_a_note(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    recipe = tiny(f"backbone.pretrained={tmp_path / 'absent.bin'}")
    result = dry_run(recipe, device="cpu", steps=1)
    assert result.weights == "random" and "not on this machine" in result.notes[0]
    assert "check the path" in result.notes[0] and "weights fetch" not in result.notes[0]  # a file: no fetching
    hub = dry_run(tiny("backbone.pretrained=hf-hub:org/absent"), device="cpu", steps=1)
    assert hub.weights == "random" and "`reident-submit weights fetch` gets them" in hub.notes[0]


def test_bad_arguments_are_one_line_errors(data_dir, tmp_path):
    with pytest.raises(SubmitError, match="--steps 0"):
        dry_run(tiny(), steps=0)
    with pytest.raises(SubmitError, match="--memory"):
        dry_run(tiny(), memory_gib=float("nan"))
    with pytest.raises(SubmitError, match="no manifest"):
        dry_run(tiny(), device="cpu", data_dir=tmp_path / "nothing")
    with pytest.raises(SubmitError, match="distinct identities"):
        dry_run(tiny("train.pairs_per_batch=100"), device="cpu", data_dir=data_dir)


def test_cli_dry_run_prints_and_writes_nothing(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    args = ["train", str(TINY), "--dry-run", "--device", "cpu", "--steps", "2", "--data", str(data_dir),
            "--memory", "1000", "--set", "train.precision=bf16"]
    out = runner.invoke(main, args)
    assert out.exit_code == 0, out.output
    for word in ("parameters", "peak memory", "s/step", "images/s", "whole recipe", "fits", "yes", "bfloat16"):
        assert word in out.output, word
    assert os.listdir(tmp_path) == []  # nothing written
    for bad, expected in ((["--out", "x"], "--dry-run takes RECIPE"), (["--resume"], "--dry-run takes RECIPE"),
                          (["--report-to", "none"], "--report-to does not go with it"),
                          (["--steps", "0"], "--steps"), (["--memory", "-1"], "--memory")):
        res = runner.invoke(main, ["train", str(TINY), "--dry-run", *bad])
        assert res.exit_code == 2 and expected in res.output, (bad, res.output)
    res = runner.invoke(main, ["train", str(TINY), "--out", "x", "--memory", "3"])
    assert res.exit_code == 2 and "go with --dry-run" in res.output
    res = runner.invoke(main, ["train", str(TINY), "--out", "x"])
    assert res.exit_code == 2 and "train needs --data" in res.output


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False); "
                                                          "scripts/gpu_check.sh runs these on one")
def test_cuda_dry_run_measures_allocated_peak_and_counts_reserved_plus_context():
    result = dry_run(tiny("train.precision=bf16"), device="cuda", steps=2, memory_gib=1e4)
    assert result.device.startswith("cuda") and result.precision == "bfloat16"
    assert result.memory_kind == "CUDA peak allocated" and result.peak_memory > result.static_memory > 0
    assert result.needed_memory > result.peak_memory and result.fits is True  # reserved + context >= allocated
    assert any("fit verdict counts" in n for n in result.notes)
    tight = dry_run(tiny(), device="cuda", steps=1, memory_gib=0.001)
    assert tight.fits is False and tight.advice
