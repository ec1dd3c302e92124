"""DDP: 2 CPU processes on gloo, launched by torchrun through the `train` command, end with the same weights
as 1 process with the same global batch, and never put one identity twice in a global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import RECORDING_RANK, comparable

from submit import training
from submit.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny-test.yaml"
STEPS = 6
TOLERANCE = 1e-5  # max |w_ddp - w_single| after 6 AdamW steps (gradient all-reduce only reorders float sums)



@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, players) -> Path:
    """A prepared synthetic DATA_DIR of other players than the other modules' (seed 2)."""
    return players(tmp_path_factory.mktemp("data"), seed=2)


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(data_dir, tmp_path):
    common = ["--set", "data.workers=0", "--set", "train.checkpoint_every=0"]
    script = tmp_path / "rank.py"
    script.write_text(RECORDING_RANK)
    ddp_out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path), "ddp", "train", str(TINY), "--data", str(data_dir), "--out", str(ddp_out), "--device", "cpu",
           "--max-steps", str(STEPS), "--set", "train.pairs_per_batch=4", *common]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "global batch 8 pairs (2 process(es))" in run.stderr

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipe = training.apply_overrides(load_recipe(TINY), ["train.pairs_per_batch=8", "data.workers=0",
                                                              "train.checkpoint_every=0"])
        single = training.train(recipe, data_dir, tmp_path / "single", device="cpu", max_steps=STEPS, progress=False)
    finally:
        torch.set_num_threads(before)

    a = comparable(torch.load(ddp_out / "last.pt", weights_only=True)["model"])
    b = comparable(torch.load(tmp_path / "single" / "last.pt", weights_only=True)["model"])
    worst = max(float((a[k] - b[k]).abs().max()) for k in b)
    assert worst < TOLERANCE, worst
    ddp_last = torch.load(ddp_out / "last.pt", weights_only=True)
    assert ddp_last["world_size"] == 2 and len(ddp_last["rng"]) == 2 and ddp_last["state"]["step"] == STEPS
    metrics = json.loads((ddp_out / "metrics.json").read_text())
    assert abs(metrics["history"][-1]["mAP"] - single["last"]["mAP"]) < 1e-6  # sharded validation agrees

    # The two ranks' shards of every global batch: disjoint, distinct identities, = the 1-process batch.
    from submit.manifest import read_manifest
    from submit.sampler import PairBatchSampler

    pids = read_manifest(data_dir).query("split == 'train'")["pid"].tolist()
    shards = [json.loads((tmp_path / f"pairs-ddp-{r}.json").read_text()) for r in range(2)]
    reference = PairBatchSampler(pids, 8, seed=recipe.seed).global_batches(0)
    assert len(shards[0]) == len(shards[1]) >= STEPS
    for step, (b0, b1) in enumerate(zip(*shards)):
        together = [tuple(p) for p in b0 + b1]
        assert len(b0) == len(b1) == 4
        assert len({pids[anchor] for anchor, _, _ in together}) == 8, f"identity repeated in global batch {step}"
        assert together == [tuple(p) for p in reference[step]]
