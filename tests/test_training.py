"""Training: recipes and overrides, schedule, parameter groups, accumulation equivalence, checkpoints,
kill/resume with a real SIGKILL, NaN stop, splits, EMA, load_trained and the CLI. Tiny ViT, tiny images."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from submit import train_step, training
from submit.cli import main
from submit.distributed import DistInfo, cpu_threads
from submit.errors import SubmitError
from submit.manifest import fingerprint, read_manifest, write_manifest
from submit.metrics import METRIC_KEYS
from submit.optimisation import EMA, LRSchedule, param_groups
from submit.recipe import load_recipe
from submit.run_folder import TrainState
from submit.sampler import PairBatchSampler
from submit.train_data import PairDataset, make_splits
from submit.train_step import ContrastiveModel, TrainStep

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny-test.yaml"
FAST = ["data.workers=0", "train.checkpoint_every=0"]


def tiny(*overrides: str):
    return training.apply_overrides(load_recipe(TINY), [*FAST, *overrides])


def weights(path: Path, key: str = "model") -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)[key]


# ---- recipes and overrides --------------------------------------------------------------------------


def test_every_recipe_in_models_validates():
    names = sorted(p.name for p in (REPO / "models").glob("*.yaml"))
    assert {"vit-b-16-openai.yaml", "vit-l-14-openai.yaml", "vit-l-14-336-openai.yaml", "eva02-l-14.yaml",
            "cpu-small.yaml", "tiny-test.yaml"} <= set(names)
    for name in names:
        recipe = load_recipe(REPO / "models" / name)
        assert recipe.name == name.removesuffix(".yaml")
        assert recipe.train.lr > 0 and recipe.train.epochs >= 1
    published = load_recipe(REPO / "models" / "vit-l-14-openai.yaml").train
    assert (published.epochs, published.pairs_per_batch, published.lr, published.min_lr, published.weight_decay,
            published.warmup_epochs, published.schedule, published.poly_power, published.label_smoothing,
            published.learn_temperature, published.augment.hflip) == (
        4, 16, 4e-5, 1e-5, 0.01, 1.0, "polynomial", 2.0, 0.1, True, 0.5)


def test_recipe_unknown_key_and_wrong_type_are_one_line_errors(tmp_path):
    base = yaml.safe_load(TINY.read_text())
    for patch, key in (({"lr_typo": 1.0}, "train.lr_typo"), ({"lr": "fast"}, "train.lr")):
        bad = {**base, "train": {**base["train"], **patch}}
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(SubmitError) as err:
            load_recipe(path)
        assert key in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_overrides_parse_values_and_name_bad_keys():
    recipe = training.apply_overrides(load_recipe(TINY), ["train.lr=1e-4", "train.augment.hflip=0",
                                                          "backbone.image_size=[48, 32]", "data.split=all"])
    assert recipe.train.lr == 1e-4 and recipe.train.augment.hflip == 0.0
    assert recipe.backbone.image_size == (48, 32) and recipe.data.split == "all"
    for item, key in (("train.nope=1", "train.nope"), ("train.epochs=two", "train.epochs"),
                      ("name.x=1", "name"), ("train.lr", "KEY=VALUE"), ("data.split=some", "data.split")):
        with pytest.raises(SubmitError) as err:
            training.apply_overrides(load_recipe(TINY), [item])
        assert key in str(err.value) and "\n" not in str(err.value)


# ---- optimisation pieces ----------------------------------------------------------------------------


def test_lr_schedule_warmup_then_decay_to_min():
    poly = LRSchedule(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14, kind="polynomial", power=2.0)
    assert [poly(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert poly(4) == 1.0 and math.isclose(poly(9), 0.1 + 0.9 * 0.5 ** 2) and math.isclose(poly(14), 0.1)
    cos = LRSchedule(lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=10, kind="cosine")
    assert math.isclose(cos(5), 0.5) and math.isclose(cos(10), 0.0, abs_tol=1e-12)
    assert LRSchedule(1.0, 0.0, 2, 10, "constant")(7) == 1.0


def test_param_groups_exclude_norms_biases_temperature_and_apply_layer_decay():
    from submit.backbones import build_embedder
    from submit.losses import LogitScale

    recipe = tiny()
    model = ContrastiveModel(build_embedder(recipe.backbone), LogitScale(10.0))
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        for p in group["params"]:
            no_decay = p.ndim < 2 or names[id(p)].startswith("temperature")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), names[id(p)]
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    # 2 blocks: stem 0.5^3, block 0 0.5^2, block 1 0.5, head (ln_post, proj, temperature) 1
    for block, expected in ((".resblocks.0.", 0.25), (".resblocks.1.", 0.5)):
        names_in = [n for n in scale if block in n]
        assert names_in and all(scale[n] == expected for n in names_in)
    assert scale["embedder.model.conv1.weight"] == 0.125 and scale["embedder.model.proj"] == 1.0
    assert scale["temperature.log_scale"] == 1.0
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def _grads(recipe, data_dir, tmp_path) -> tuple[dict[str, torch.Tensor], float]:
    trainer = training._Trainer(recipe, data_dir, tmp_path, torch.device("cpu"), DistInfo())
    batch = next(iter(trainer.loader))
    loss = trainer.train_step.accumulate_gradients(batch)
    return {n: p.grad.clone() for n, p in trainer.train_step.model.named_parameters() if p.grad is not None}, loss


def test_accumulation_keeps_whole_batch_negatives_same_gradients(data_dir, tmp_path):
    full, loss_full = _grads(tiny("train.pairs_per_batch=8"), data_dir, tmp_path)
    accum, loss_accum = _grads(tiny("train.pairs_per_batch=4", "train.accum_steps=2"), data_dir, tmp_path)
    ckpt, _ = _grads(tiny("train.pairs_per_batch=8", "train.grad_checkpointing=true"), data_dir, tmp_path)
    assert abs(loss_full - loss_accum) < 1e-6
    assert full.keys() == accum.keys() and "temperature.log_scale" in full
    for name in full:
        assert torch.allclose(full[name], accum[name], atol=1e-6, rtol=1e-4), name
        assert torch.allclose(full[name], ckpt[name], atol=1e-6, rtol=1e-4), name


def test_pair_dataset_is_seeded_per_pair_and_caching_changes_nothing(data_dir):
    from submit.recipe import AugmentSpec

    paths = read_manifest(data_dir).query("split == 'train'")["path"].tolist()
    spec = AugmentSpec(hflip=0.5, random_erasing=0.5, color_jitter=0.3)
    plain = PairDataset(data_dir, paths, (32, 16), (0.5,) * 3, (0.25,) * 3, spec)
    cached = PairDataset(data_dir, paths, (32, 16), (0.5,) * 3, (0.25,) * 3, spec, cache=True)
    before = torch.get_rng_state()
    first = plain[(0, 1, 7)]
    assert first.shape == (2, 3, 32, 16) and torch.equal(before, torch.get_rng_state())  # global RNG untouched
    assert torch.equal(first, plain[(0, 1, 7)]) and not torch.equal(first, plain[(0, 1, 8)])
    for seed in (7, 8, 9):
        assert torch.equal(plain[(0, 1, seed)], cached[(0, 1, seed)])
    assert cached.cache is not None and set(cached.cache) == {0, 1}


def test_accumulation_gives_same_weights_as_one_full_batch(data_dir, tmp_path):
    training.train(tiny("train.pairs_per_batch=8"), data_dir, tmp_path / "full", device="cpu", max_steps=4,
                   progress=False)
    training.train(tiny("train.pairs_per_batch=4", "train.accum_steps=2"), data_dir, tmp_path / "accum",
                   device="cpu", max_steps=4, progress=False)
    a, b = weights(tmp_path / "full" / "last.pt"), weights(tmp_path / "accum" / "last.pt")
    for key in [k for k in a if k.endswith("attn.in_proj_bias")]:
        # The key bias gets a zero gradient in exact arithmetic (softmax ignores a shift shared by all keys):
        # both runs see only ~1e-9 rounding noise there, which Adam rescales to arbitrary steps. Skip it.
        third = len(a[key]) // 3
        a[key], b[key] = a[key].clone(), b[key].clone()
        a[key][third:2 * third] = b[key][third:2 * third] = 0
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5, worst


# ---- runs, checkpoints, resume ----------------------------------------------------------------------


def test_run_dir_contents_and_load_trained(data_dir, tmp_path):
    out = tmp_path / "run"
    result = training.train(tiny("train.epochs=2"), data_dir, out, device="cpu", progress=False)
    assert {"recipe.yaml", "last.pt", "best.pt", "metrics.csv", "metrics.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob(".*tmp"))
    sampler = PairBatchSampler(read_manifest(data_dir).query("split == 'train'")["pid"].tolist(), 4)
    per_epoch = [len(sampler.global_batches(e)) for e in range(2)]
    assert 25 <= min(per_epoch) and max(per_epoch) <= 27  # 108 pairs; a clashing tail may be dropped
    assert result["epochs"] == 2 and result["steps"] == sum(per_epoch) and 0 <= result["best"]["mAP"] <= 1
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step,loss,lr,temperature,images_per_s") and len(rows) == 3
    last = torch.load(out / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scaler", "schedule", "state", "rng", "sampler", "recipe"} <= set(last)
    assert last["state"]["epoch"] == 2 and last["recipe"]["name"] == "tiny-test"
    embedder, recipe = training.load_trained(out)
    assert recipe == tiny("train.epochs=2") and not embedder.training
    best = weights(out / "best.pt")
    assert all(torch.equal(v, best[k]) for k, v in embedder.state_dict().items())
    with torch.no_grad():
        assert embedder(torch.zeros(2, 3, 32, 32)).shape == (2, embedder.embed_dim)


def test_loader_workers_end_when_train_returns(data_dir, tmp_path, one_thread):
    """The trainer may sit in a reference cycle; its persistent loader workers must not wait for a garbage
    collection, which could run in a process forked later (tune --train-space printed 'can only test a child
    process' from the next loader's workers)."""
    import multiprocessing

    before = set(multiprocessing.active_children())
    training.train(tiny("data.workers=1", "train.epochs=1"), data_dir, tmp_path / "run", device="cpu",
                   progress=False)
    assert set(multiprocessing.active_children()) - before == set()


def test_existing_run_needs_resume_and_resume_needs_same_recipe(data_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SubmitError, match="nothing to resume"):
        training.train(tiny(), data_dir, out, resume=True, progress=False)
    training.train(tiny(), data_dir, out, max_steps=3, progress=False)
    with pytest.raises(SubmitError, match="--resume"):
        training.train(tiny(), data_dir, out, progress=False)
    with pytest.raises(SubmitError, match="train.lr"):
        training.train(tiny("train.lr=0.5"), data_dir, out, resume=True, progress=False)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    ckpt["sampler"]["global_pairs"] *= 2  # as if launched on 2 processes
    torch.save(ckpt, out / "last.pt")
    with pytest.raises(SubmitError, match="same number of processes"):
        training.train(tiny(), data_dir, out, resume=True, progress=False)
    with pytest.raises(SubmitError, match="not a reident-submit training checkpoint"):
        torch.save({"x": 1}, tmp_path / "foreign.pt")
        training.load_trained(tmp_path, str(tmp_path / "foreign.pt"))


def test_run_records_its_manifest_and_resume_on_other_data_is_refused(data_dir, tmp_path):
    out = tmp_path / "run"
    training.train(tiny(), data_dir, out, max_steps=2, progress=False)
    expected = fingerprint(read_manifest(data_dir))
    for name in ("last.pt", "best.pt"):
        assert torch.load(out / name, weights_only=True)["manifest"] == expected, name
    assert json.loads((out / "metrics.json").read_text())["manifest"] == expected
    assert training.recorded_manifest(out / "best.pt") == expected
    moved = tmp_path / "moved"  # the same prepared data in another folder: same fingerprint, resume goes on
    shutil.copytree(data_dir, moved)
    assert training.train(tiny(), moved, out, resume=True, max_steps=3, progress=False)["steps"] == 3
    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    df = read_manifest(other)
    write_manifest(df[df["pid"] != df.loc[df["split"] == "train", "pid"].iloc[0]], other)  # one player fewer
    with pytest.raises(SubmitError) as err:
        training.train(tiny(), other, out, resume=True, progress=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{out}: the run was trained on manifest {expected[:12]}")
    assert fingerprint(read_manifest(other))[:12] in message
    legacy = torch.load(out / "last.pt", weights_only=True)
    del legacy["manifest"]  # a run saved before manifests were recorded resumes anywhere
    torch.save(legacy, out / "last.pt")
    assert training.recorded_manifest(out / "last.pt") is None
    assert training.train(tiny(), other, out, resume=True, max_steps=4, progress=False)["steps"] == 4


KILLED_RUN = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    from submit import training
    from submit.recipe import load_recipe

    def on_step(self, step):
        print(f"step {step}", flush=True)
        time.sleep(0.3)

    training._Trainer.on_step = on_step
    recipe = training.apply_overrides(load_recipe(sys.argv[1]), sys.argv[5:])
    training.train(recipe, sys.argv[2], sys.argv[3], max_steps=int(sys.argv[4]), progress=False)
""")


def test_sigkill_then_resume_ends_with_identical_weights(data_dir, tmp_path):
    overrides = ["data.workers=0", "train.checkpoint_every=2", "train.pairs_per_batch=8"]
    recipe = training.apply_overrides(load_recipe(TINY), overrides)
    steps = 16  # 13 steps per epoch: the resumed run crosses an epoch boundary
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(TINY), str(data_dir), str(killed), str(steps),
                             *overrides], stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.strip() == "step 5":
            os.kill(proc.pid, signal.SIGKILL)
            break
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert torch.load(killed / "last.pt", weights_only=True)["state"]["step"] == 4
    training.train(recipe, data_dir, killed, resume=True, max_steps=steps, progress=False)
    training.train(recipe, data_dir, tmp_path / "straight", max_steps=steps, progress=False)
    a = torch.load(killed / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    assert a["state"]["step"] == b["state"]["step"] == steps
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["temperature"]["log_scale"], b["temperature"]["log_scale"])
    exp_a = a["optimizer"]["state"][0]["exp_avg_sq"]
    assert torch.equal(exp_a, b["optimizer"]["state"][0]["exp_avg_sq"])


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    real = train_step.build_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)

        def forward(a, p, scale):
            calls["n"] += 1
            value = loss(a, p, scale)
            return value * float("nan") if calls["n"] == 5 else value
        return forward

    monkeypatch.setattr(train_step, "build_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(SubmitError) as err:
        training.train(tiny("train.checkpoint_every=2"), data_dir, out, progress=False)
    message = str(err.value)
    assert "step 5" in message and "nan" in message and "\n" not in message
    assert torch.load(out / "last.pt", weights_only=True)["state"]["step"] == 4


def test_huge_lr_diverges_to_a_one_line_error(data_dir, tmp_path):
    with pytest.raises(SubmitError, match=r"loss is (nan|inf) at step \d+"):
        training.train(tiny("train.lr=1e30", "train.warmup_epochs=0"), data_dir, tmp_path / "run", progress=False)


# ---- splits, EMA, triplet ---------------------------------------------------------------------------


def test_split_all_skips_validation_and_still_writes_best(data_dir, tmp_path):
    result = training.train(tiny("data.split=all", "train.epochs=1"), data_dir, tmp_path / "run", progress=False)
    assert "skipped" in result["validation"] and result["best"] is None
    assert (tmp_path / "run" / "best.pt").is_file()
    assert result["steps"] >= (108 + 36) // 4 - 2  # test crops join the training set (27 steps without them)


def test_kfold_holds_out_identities(data_dir):
    df = read_manifest(data_dir)
    recipe = tiny("data.split=kfold", "data.folds=4", "data.fold=1")
    splits = make_splits(df, recipe.data, recipe.seed)
    held = set(splits.query["pid"])
    assert held and held == set(splits.gallery["pid"]) and not held & set(splits.train["pid"])
    assert len(splits.query) == len(held) and 5 <= len(held) <= 7  # 24 identities in 4 folds
    with pytest.raises(SubmitError, match="data.fold"):
        make_splits(df, tiny("data.split=kfold", "data.folds=4", "data.fold=4").data, 0)


def test_ema_weights_are_validated_saved_and_loaded(data_dir, tmp_path):
    out = tmp_path / "run"
    training.train(tiny("train.ema_decay=0.9", "train.epochs=1"), data_dir, out, device="cpu", progress=False)
    last = torch.load(out / "last.pt", weights_only=True)
    best = weights(out / "best.pt")
    key = next(k for k, v in best.items() if v.dtype.is_floating_point and v.ndim == 2)
    assert torch.equal(best[key], last["ema"][key]) and not torch.equal(best[key], last["model"][key])
    embedder, _ = training.load_trained(out, "last")
    assert torch.equal(embedder.state_dict()[key], last["ema"][key])


def test_triplet_ablation_trains_with_a_frozen_temperature(data_dir, tmp_path):
    result = training.train(tiny("train.loss=triplet", "train.epochs=1"), data_dir, tmp_path / "run",
                            max_steps=5, progress=False)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert result["steps"] == 5 and np.isfinite(result["last"]["loss"])
    assert math.isclose(float(last["temperature"]["log_scale"].exp()), 1 / 0.07, rel_tol=1e-5)


def test_too_few_identities_for_the_batch_is_a_one_line_error(data_dir, tmp_path):
    with pytest.raises(SubmitError, match="train.pairs_per_batch"):
        training.train(tiny("train.pairs_per_batch=64"), data_dir, tmp_path / "run", progress=False)


def test_training_state_round_trips_through_a_checkpoint_and_a_missing_field_takes_its_default():
    state = TrainState(step=7, epoch=1, batch_in_epoch=3, loss_sum=2.5, loss_count=3, best_map=0.4,
                       history=[{"epoch": 1}])
    saved = state.to_checkpoint()
    assert saved == {"state": {"step": 7, "epoch": 1, "batch_in_epoch": 3, "loss_sum": 2.5, "loss_count": 3,
                               "best_map": 0.4}, "history": [{"epoch": 1}]}
    assert TrainState.from_checkpoint(saved) == state
    del saved["state"]["best_map"]  # a checkpoint saved before a field existed resumes with the field's default
    assert TrainState.from_checkpoint(saved) == dataclasses.replace(state, best_map=TrainState().best_map)


def test_validation_embeds_each_crop_once_through_the_predictors_embedder(data_dir):
    """`validate` embeds with `embedding.embed_views` (identity view, no cache): the normalised feature of each
    letterboxed crop, the model left in training mode and the global random stream untouched."""
    from submit.backbones import build_embedder
    from submit.embedding import embed_views
    from submit.transforms import CropDataset

    torch.manual_seed(0)
    model = build_embedder(tiny().backbone).eval()
    rows = read_manifest(data_dir).head(6)
    crops = CropDataset(data_dir, rows["path"].tolist(), tuple(model.input_size), tuple(model.mean), tuple(model.std))
    with torch.no_grad():
        want = nn.functional.normalize(model(torch.stack([crops[i][0] for i in range(len(crops))])), dim=1).numpy()
    model.train()
    before = torch.get_rng_state()
    got = embed_views(model, data_dir, rows, training.IDENTITY_VIEW, batch_size=4, device="cpu", workers=0,
                      progress=False, in_training=True)
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-5
    assert model.training and torch.equal(before, torch.get_rng_state())


# ---- CLI --------------------------------------------------------------------------------------------


def test_cli_train_with_overrides_and_errors(data_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    args = ["train", str(TINY), "--data", str(data_dir), "--out", str(out), "--epochs", "1", "--max-steps", "3",
            "--set", "train.lr=1e-4", "--set", "data.workers=0"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "mAP" in result.output and yaml.safe_load((out / "recipe.yaml").read_text())["train"]["lr"] == 1e-4
    bad = runner.invoke(main, [*args[:4], "--out", str(tmp_path / "x"), "--set", "train.lrr=1"])
    assert bad.exit_code == 2 and "train.lrr" in bad.output and len(bad.output.strip().splitlines()) == 1
    again = runner.invoke(main, args)
    assert again.exit_code == 2 and "--resume" in again.output


def test_cpu_threads_leave_cores_to_loader_workers_and_busy_cpus_unless_omp_is_set(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert cpu_threads(torch.device("cpu"), workers=0) == cores
    assert cpu_threads(torch.device("cpu"), workers=1) == max(1, cores - 1)
    assert cpu_threads(torch.device("cpu"), workers=cores + 3) == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (float(cores), 0.0, 0.0))  # every core busy elsewhere
    assert cpu_threads(torch.device("cpu"), workers=0) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert cpu_threads(torch.device("cpu"), workers=0) == 1  # the user's setting wins


# ---- training state that earlier tests could not see change (each test failed on a hand-made mutation) --------


def test_ema_update_is_decay_times_average_plus_the_rest_times_live_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.9)
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
    real = TrainStep.__call__

    def drawing(self, batch):
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(1))))
        return real(self, batch)

    monkeypatch.setattr(TrainStep, "__call__", drawing)
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
    trainer = training._Trainer(recipe, data_dir, tmp_path, torch.device("cpu"), DistInfo())
    model = trainer.train_step.model
    model.train()
    before = {k: v.clone() for k, v in model.embedder.named_buffers()}
    assert any(k.endswith("running_mean") for k in before)
    batch = next(iter(trainer.loader))
    micro = batch.chunk(2)
    reference = copy.deepcopy(model.embedder).train()
    with torch.no_grad():
        for pairs in micro:  # what the two gradient passes do to the statistics
            reference(torch.cat([pairs[:, 0], pairs[:, 1]]))

    trainer.train_step.cached_features(micro)
    for name, value in model.embedder.named_buffers():
        assert torch.equal(value, before[name]), name
    trainer.train_step(batch)
    expected = dict(reference.named_buffers())
    moved = 0
    for name, value in model.embedder.named_buffers():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)
        moved += not torch.equal(value, before[name])
    assert moved


def test_best_pt_holds_the_first_epoch_with_the_highest_map(data_dir, tmp_path, monkeypatch):
    maps = iter([0.5, 0.9, 0.9, 0.7])
    monkeypatch.setattr(training, "validate", lambda *args, **kwargs: dict.fromkeys(METRIC_KEYS, next(maps)))
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    real_end = training._Trainer._end_epoch

    def end(self, partial):
        snapshots[self.state.epoch + 1] = {k: v.clone() for k, v in self.train_step.model.embedder.state_dict().items()}
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
