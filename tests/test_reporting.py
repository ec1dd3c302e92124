"""Training curves: TensorBoard event files read back by tensorboard's own reader (also after a killed run is
resumed: no step twice), `--report-to` parsing and errors, W&B through a stand-in module, rank 0 only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from submit import reporting, training
from submit.cli import main
from submit.errors import SubmitError
from submit.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny-test.yaml"
# 18 training identities, 8 pairs per batch: 13 steps per epoch, 26 in two epochs.
FAST = ["data.workers=0", "train.pairs_per_batch=8", "train.checkpoint_every=2", "train.epochs=2"]


def tiny(*overrides: str):
    return training.apply_overrides(load_recipe(TINY), [*FAST, *overrides])


def read_events(log_dir: Path):
    """tensorboard's own reader over every event file in `log_dir` (purges applied as TensorBoard does)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def steps(acc, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


class Killed(Exception):
    """Stands in for a kill in the middle of training."""


def test_killed_then_resumed_run_has_every_step_once(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def die_at_15(self, step):
        if step == 15:
            raise Killed

    monkeypatch.setattr(training._Trainer, "on_step", die_at_15)
    with pytest.raises(Killed):
        training.train(tiny(), data_dir, out, progress=False)
    assert torch.load(out / "last.pt", weights_only=True)["state"]["step"] == 14
    before = read_events(out / "tb")
    assert steps(before, "train/loss") == list(range(1, 16))  # step 15 was logged, not checkpointed
    monkeypatch.undo()

    result = training.train(tiny(), data_dir, out, resume=True, progress=False)
    assert result["steps"] == 26
    acc = read_events(out / "tb")
    tags = acc.Tags()
    assert {f"train/{k}" for k in reporting.STEP_KEYS} | {f"val/{k}" for k in reporting.VALIDATION_KEYS} <= set(
        tags["scalars"])
    for key in reporting.STEP_KEYS:
        assert steps(acc, f"train/{key}") == list(range(1, 27)), key  # no duplicate, no gap
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [r["step"] for r in history] == [13, 26]
    for key in ("mAP", "rank1", "mINP"):
        events = acc.Scalars(f"val/{key}")
        assert [e.step for e in events] == [13, 26]
        assert [round(e.value, 5) for e in events] == [round(r[key], 5) for r in history]
    temps = [e.value for e in acc.Scalars("train/temperature")]
    assert all(1.0 < t <= 100.0 for t in temps)  # CLIP's logit scale (1/0.07 at the start)
    assert all(e.value > 0 for e in acc.Scalars("train/images_per_s"))
    recipe_text = [t for t in tags["tensors"] if t.startswith("recipe")]
    assert recipe_text, tags
    text = acc.Tensors(recipe_text[0])[0].tensor_proto.string_val[0].decode()
    assert "name: tiny-test" in text and "pairs_per_batch: 8" in text


def test_resuming_a_stopped_or_finished_run_reports_nothing_twice(data_dir, tmp_path):
    out = tmp_path / "run"
    training.train(tiny("train.epochs=1"), data_dir, out, max_steps=3, progress=False)
    assert len(list((out / "tb").iterdir())) == 1
    training.train(tiny("train.epochs=1"), data_dir, out, resume=True, max_steps=3, progress=False)  # re-validates
    training.train(tiny("train.epochs=1"), data_dir, out, resume=True, progress=False)  # to the epoch's end
    files = sorted((out / "tb").iterdir())
    training.train(tiny("train.epochs=1"), data_dir, out, resume=True, progress=False)  # finished: a no-op
    assert sorted((out / "tb").iterdir()) == files  # no empty event file either
    acc = read_events(out / "tb")
    assert steps(acc, "train/loss") == list(range(1, 14)) and steps(acc, "val/mAP") == [3, 13]


def test_report_to_none_writes_no_tb_folder(data_dir, tmp_path):
    out = tmp_path / "run"
    training.train(tiny("train.epochs=1"), data_dir, out, max_steps=2, progress=False, report_to=("none",))
    assert (out / "last.pt").is_file() and not (out / "tb").exists()


def test_parse_report_to_names_and_errors(monkeypatch):
    assert reporting.parse_report_to("tensorboard") == ("tensorboard",)
    assert reporting.parse_report_to(" TensorBoard ,tensorboard") == ("tensorboard",)
    assert reporting.parse_report_to("none") == ()
    assert reporting.parse_report_to(None) == reporting.DEFAULT
    for bad, words in (("tensorbord", "tensorboard, wandb, none"), ("none,tensorboard", "'none' cannot"),
                       ("", "expected")):
        with pytest.raises(SubmitError) as err:
            reporting.parse_report_to(bad)
        assert words in str(err.value) and "--report-to" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: import raises ImportError
    with pytest.raises(SubmitError) as err:
        reporting.parse_report_to("tensorboard,wandb")
    assert "--report-to wandb" in str(err.value) and "pip install wandb" in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_report_to_wandb_without_the_package_is_one_line(data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(TINY), "--data", str(data_dir), "--out", str(out),
                                       "--report-to", "wandb", "--set", "data.workers=0"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "pip install wandb" in result.output and not out.exists()


def test_wandb_reporter_is_offline_and_resumes_the_same_run(data_dir, tmp_path, monkeypatch):
    calls: list[tuple[str, object]] = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", (step, sorted(values))))

        def finish(self):
            calls.append(("finish", None))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun()

    fake = types.ModuleType("wandb")
    fake.init = init  # type: ignore[attr-defined]
    fake.util = types.SimpleNamespace(generate_id=lambda: "abc123")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    training.train(tiny("train.epochs=1"), data_dir, out, max_steps=3, progress=False,
                   report_to=("tensorboard", "wandb"))
    inits = [c[1] for c in calls if c[0] == "init"]
    assert len(inits) == 1 and inits[0]["mode"] == "offline" and inits[0]["id"] == "abc123"
    assert inits[0]["config"]["name"] == "tiny-test" and inits[0]["dir"] == str(out)
    logged = [c[1] for c in calls if c[0] == "log"]
    assert [s for s, keys in logged if "train/loss" in keys] == [1, 2, 3]
    assert any("val/mAP" in keys for _, keys in logged) and calls[-1] == ("finish", None)
    assert steps(read_events(out / "tb"), "train/loss") == [1, 2, 3]  # both at once
    monkeypatch.setenv("WANDB_MODE", "online")
    calls.clear()
    training.train(tiny("train.epochs=1"), data_dir, out, resume=True, max_steps=4, progress=False,
                   report_to=("wandb",))
    init_kw = next(c[1] for c in calls if c[0] == "init")
    assert init_kw["id"] == "abc123" and init_kw["mode"] == "online" and init_kw["resume"] == "allow"


def test_only_rank_zero_reports(tmp_path):
    quiet = reporting.open_reporter(("tensorboard",), tmp_path, main=False, start_step=0, name="x", recipe={})
    assert isinstance(quiet, reporting.NullReporter)
    quiet.step(1, {"loss": 1.0})
    quiet.close()
    assert not (tmp_path / "tb").exists()


def test_under_torchrun_only_rank_zero_writes_events(data_dir, tmp_path):
    script = tmp_path / "cli.py"
    script.write_text("import sys\nfrom submit.cli import main\nmain(sys.argv[1:])\n")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "train", str(TINY), "--data", str(data_dir), "--out", str(out), "--device", "cpu", "--max-steps", "3",
           "--set", "train.pairs_per_batch=4", "--set", "data.workers=0", "--set", "train.checkpoint_every=0"]
    run = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(list((out / "tb").iterdir())) == 1  # one writer: rank 0's
    acc = read_events(out / "tb")
    assert steps(acc, "train/loss") == [1, 2, 3] and steps(acc, "val/mAP") == [3]
