"""Resuming a run on another number of processes (issue 24, point 3): P processes x accumulation A continue on P'
processes with accumulation P x A / P' (the global batch kept, the same pairs in every step), and a world size
that cannot keep it is refused in one line naming both. CPU, gloo, torchrun subprocesses, tiny recipe.

The first run is stopped by `--max-steps` (a partial validation and last.pt at that step, nothing timed); every
process records the batches its sampler hands out, so the pairs of each step are compared, not inferred."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import RECORDING_RANK, comparable

from submit import training
from submit.distributed import DistInfo
from submit.errors import SubmitError
from submit.manifest import fingerprint, read_manifest
from submit.run_folder import check_resumable, load_checkpoint, rng_state, save_atomic

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny-test.yaml"
STEPS, STOP = 8, 3  # 13 steps per epoch at 8 pairs on this data: the stop and the end are both mid-epoch
# max |w_resumed - w_straight|: the resumed steps sum the two halves of each global batch in .grad (accumulation
# over cached features, each half forwarded alone as on its rank) where DDP all-reduces them: the same exact
# gradient, in another float order where the kernels differ. Measured 0 (bitwise equal, 1 CPU thread); the bound
# is tests/test_ddp.py's for 2 processes against 1 (the same blanked key bias: Adam turns its rounding into steps)
TOLERANCE = 1e-5



@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, players) -> Path:
    return players(tmp_path_factory.mktemp("data"), seed=3)


def _train(tmp: Path, tag: str, data_dir: Path, out: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    """`train` on `processes` gloo workers under torchrun (1: a plain process, no torchrun), recording pairs."""
    script = tmp / "rank.py"
    script.write_text(RECORDING_RANK)
    launch = (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
              if processes > 1 else [])
    cmd = [sys.executable, *launch, str(script), str(tmp), tag, "train", str(TINY), "--data", str(data_dir),
           "--out", str(out), "--device", "cpu", "--set", "data.workers=0", "--set", "train.pairs_per_batch=4",
           "--set", "train.checkpoint_every=0", *extra]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=400)


def _global_batches(tmp: Path, tag: str, processes: int) -> list[list[tuple[int, ...]]]:
    """Each step's global batch: the processes' shards side by side (rank order, as the sampler cuts them)."""
    shards = [json.loads((tmp / f"pairs-{tag}-{rank}.json").read_text()) for rank in range(processes)]
    assert len({len(s) for s in shards}) == 1, [len(s) for s in shards]
    return [[tuple(pair) for shard in step for pair in shard] for step in zip(*shards)]


def test_two_processes_resumed_on_one_with_accumulation_two_train_the_same_steps(data_dir, tmp_path):
    straight = _train(tmp_path, "straight", data_dir, tmp_path / "straight", 2, "--max-steps", str(STEPS))
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "run"
    first = _train(tmp_path, "first", data_dir, out, 2, "--max-steps", str(STOP))
    assert first.returncode == 0, first.stderr[-3000:]
    stopped = load_checkpoint(out / "last.pt")
    assert stopped["state"]["step"] == STOP and stopped["world_size"] == 2
    assert stopped["sampler"]["global_pairs"] == 8 and stopped["sampler"]["accum_steps"] == 1

    second = _train(tmp_path, "second", data_dir, out, 1, "--resume", "--max-steps", str(STEPS))
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed at step {STOP}" in second.stderr
    assert "resumed on 1 processes with accumulation 2 (global batch kept: 8 pairs; the run had 2 processes x " \
           "accum 1); random generators seeded from the seed, rank and step (its saved ones are for 2)" in second.stderr
    last = load_checkpoint(out / "last.pt")
    assert last["state"]["step"] == STEPS and last["world_size"] == 1 and len(last["rng"]) == 1
    assert last["sampler"]["global_pairs"] == 8 and last["sampler"]["accum_steps"] == 2  # the next resume's layout
    assert last["recipe"]["train"]["accum_steps"] == 1  # the recipe is the run's: a resume on 2 checks against it
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 1 and metrics["accum_steps"] == 2 and metrics["global_batch_pairs"] == 8

    # the same pairs in every step: 3 global batches from 2 processes, then 5 from 1 (8 pairs each, not 4)
    reference = _global_batches(tmp_path, "straight", 2)
    resumed = _global_batches(tmp_path, "first", 2) + _global_batches(tmp_path, "second", 1)
    assert len(reference) == len(resumed) == STEPS
    assert all(len(batch) == 8 for batch in resumed)
    assert resumed == reference

    a = comparable(last["model"])
    b = comparable(load_checkpoint(tmp_path / "straight" / "last.pt")["model"])
    worst = max(float((a[k] - b[k]).abs().max()) for k in b)
    ends = last["temperature"]["log_scale"], load_checkpoint(tmp_path / "straight" / "last.pt")["temperature"][
        "log_scale"]
    worst = max(worst, float((ends[0] - ends[1]).abs()))
    assert worst < TOLERANCE, worst

    # the recorded layout drives the next resume: 1 x 2 goes back to 2 processes x 1, not to 3 or 4 processes
    recipe = training.apply_overrides(training.load_recipe(TINY), ["data.workers=0", "train.pairs_per_batch=4",
                                                                  "train.checkpoint_every=0"])
    manifest = fingerprint(read_manifest(data_dir))
    assert check_resumable(last, out / "last.pt", recipe, manifest, data_dir, 2) == 1
    assert check_resumable(last, out / "last.pt", recipe, manifest, data_dir, 1) == 2
    for world, why in ((3, "1 x 2 / 3"), (4, "1 x 2 / 4")):
        with pytest.raises(SubmitError) as refused:
            check_resumable(last, out / "last.pt", recipe, manifest, data_dir, world)
        assert str(refused.value) == (f"{out / 'last.pt'}: trained with global batch 8 pairs on 1 processes x accum 2;"
                                      f" {world} processes cannot keep it ({why} is not a whole number)")


def test_a_world_size_that_cannot_keep_the_global_batch_is_refused_in_one_line(data_dir, tmp_path):
    """A run of 3 processes x accum 1 (a 1-process run's last.pt relabelled: 3 gloo processes are not needed to
    write one) resumed on 2 processes: refused by every rank before any step, the line naming both numbers."""
    out = tmp_path / "run"
    first = _train(tmp_path, "first", data_dir, out, 1, "--max-steps", "1", "--set", "train.pairs_per_batch=12")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = load_checkpoint(out / "last.pt")
    ckpt["world_size"], ckpt["rng"] = 3, ckpt["rng"] * 3
    ckpt["recipe"]["train"]["pairs_per_batch"] = 4  # 4 pairs x 3 processes: the same global batch of 12
    save_atomic(ckpt, out / "last.pt")
    before = (out / "last.pt").read_bytes()

    run = _train(tmp_path, "second", data_dir, out, 2, "--resume", "--max-steps", "2")
    assert run.returncode != 0
    line = (f"error: {out / 'last.pt'}: trained with global batch 12 pairs on 3 processes x accum 1; 2 processes "
            "cannot keep it (3 x 1 / 2 is not a whole number)")
    errors = {text for text in run.stderr.splitlines() if text.startswith("error:")}
    assert errors == {line}, run.stderr[-3000:]  # (each rank that got there first says it; torchrun adds its own)
    assert "SubmitError" not in run.stderr  # the line, not a traceback of ours
    assert (out / "last.pt").read_bytes() == before  # nothing trained, nothing written
    assert json.loads((tmp_path / "pairs-second-0.json").read_text()) == []


def _draws() -> tuple:
    """The next draw of each generator a training step uses (python, numpy, torch)."""
    import random

    import numpy as np
    import torch
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_a_resume_on_the_same_world_size_continues_each_ranks_saved_generators():
    training._seed_all(5)
    saved = [rng_state(), rng_state()]
    expected = _draws()
    training._seed_all(99)
    assert training.restore_rng(saved, DistInfo(world_size=2, rank=1), seed=0, step=3)
    assert _draws() == expected


def test_a_resume_on_another_world_size_seeds_its_generators_from_the_seed_the_rank_and_the_step():
    """Saved states of 2 ranks mean nothing to 1 (or 4): the generators restart from (seed, rank, step), the same
    for every such resume, different per rank and step, and not a fresh run's stream (no replayed first draws)."""
    training._seed_all(5)
    saved = [rng_state(), rng_state()]

    def resumed(world: int, rank: int, step: int) -> tuple:
        training._seed_all(123)  # whatever the generators held before
        assert not training.restore_rng(saved, DistInfo(world_size=world, rank=rank), seed=7, step=step)
        return _draws()

    assert resumed(1, 0, 3) == resumed(1, 0, 3)
    training._seed_all(7)  # a fresh run's rank 0 (its per-rank seed: recipe seed + 1000 x rank)
    fresh = _draws()
    after = {resumed(1, 0, 3), resumed(1, 0, 4), resumed(4, 1, 3), resumed(4, 2, 3), fresh}
    assert len(after) == 5
