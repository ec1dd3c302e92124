"""CUDA-only checks (marked `cuda`; each skips with its reason elsewhere; scripts/gpu_check.sh runs them):
NCCL DDP under torchrun on every GPU against one process with the same global batch, and the device plumbing
(device check, pinned loader memory). The AMP and embedding CUDA tests live in tests/test_precision.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from submit import training
from submit.distributed import DistInfo
from submit.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny-test.yaml"
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
STEPS = 4
TOLERANCE = 2e-3  # cuDNN/TF32 convolutions and NCCL's sum order: looser than the gloo test's 1e-5
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU (torch.cuda.is_available() is False); "
                                                   "scripts/gpu_check.sh runs these on one")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, players) -> Path:
    """A prepared synthetic DATA_DIR of other players than the other modules' (seed 2)."""
    return players(tmp_path_factory.mktemp("data"), seed=2)


def test_cuda_device_check_and_pinned_loader(data_dir, tmp_path):
    from submit.device import check_device

    assert check_device("cuda").type == "cuda"
    recipe = training.apply_overrides(load_recipe(TINY), ["data.workers=1"])
    run = training._Trainer(recipe, data_dir, tmp_path, torch.device("cuda", 0), DistInfo())
    assert run.loader.pin_memory is True
    batch = next(iter(run.loader))
    assert batch.is_pinned()
    assert run.train_step(batch) > 0


@pytest.mark.skipif(GPUS < 2, reason=f"NCCL DDP needs 2 or more GPUs (this machine has {GPUS}); "
                                     "the gloo version runs on CPU in tests/test_ddp.py")
def test_nccl_ddp_on_every_gpu_matches_one_process(data_dir, tmp_path):
    per_rank = 2
    common = ["--set", "data.workers=0", "--set", "train.checkpoint_every=0", "--set", "train.precision=fp32",
              "--max-steps", str(STEPS)]
    script = tmp_path / "rank.py"
    script.write_text("from submit.cli import main\nmain()\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(GPUS),
           str(script), "train", str(TINY), "--data", str(data_dir), "--out", str(tmp_path / "ddp"),
           "--set", f"train.pairs_per_batch={per_rank}", *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"global batch {per_rank * GPUS} pairs ({GPUS} process(es))" in run.stderr
    recipe = training.apply_overrides(load_recipe(TINY), [f"train.pairs_per_batch={per_rank * GPUS}",
                                                          "data.workers=0", "train.checkpoint_every=0",
                                                          "train.precision=fp32"])
    training.train(recipe, data_dir, tmp_path / "single", device="cuda", max_steps=STEPS, progress=False)
    a = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "single" / "last.pt", weights_only=True)["model"]
    skip = ("attn.in_proj_bias",)  # its key third has an exact zero gradient: Adam amplifies rounding there
    worst = max(float((a[k] - b[k]).abs().max()) for k in b if not k.endswith(skip))
    assert worst < TOLERANCE, worst
