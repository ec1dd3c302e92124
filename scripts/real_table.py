"""Helpers of scripts/real_benchmark.sh: a per-seed copy of an ensemble spec, and the markdown result table.

    python scripts/real_table.py spec ENSEMBLE.yaml SEED OUT.yaml [--member I] [--only KEY ...]
                                      [--training-from TUNED.yaml ...]
        copy the spec with every member's train.seed shifted by SEED and its recipe path made absolute;
        --member keeps member I alone, --only writes `tune: {only: [KEY ...]}` (a narrowed search),
        --training-from gives each member the training a study chose for it (the train.overrides of the
        member with the same `run` in a `tune --train-space` output) and copies those files' comment blocks
    python scripts/real_table.py link ENSEMBLE.yaml RUNS_DIR DIR [DIR ...]
        link into RUNS_DIR each member run already trained in some DIR/NAME with exactly the member's recipe
        (its recipe.yaml), so a script re-scores finished runs instead of training them again
    python scripts/real_table.py tune OUT_DIR SEED_DIR [SEED_DIR ...]
        scripts/real_tune.sh's table: the hand-chosen and the tuned spec on the test split per seed (their
        `evaluate --json` files), mean ± sd, the tuned spec's comment block; written to OUT_DIR/results.md
    python scripts/real_table.py table OUT_DIR DATA_DIR SEED_DIR [SEED_DIR ...]
        score every stage of each seed's ensemble on the test split (cached features, so cheap), and
        write OUT_DIR/results.md: the paper's table in miniature (colour histogram, zero-shot, scratch,
        pre-trained + InfoNCE / triplet, + flip TTA, + re-ranking, the ensemble) when a seed dir holds
        ablation.yaml, then every stage of the ensemble; mean and spread over seeds, train and predict
        times, the machine, the date and the load average
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

import yaml

from submit.ablation import HIST_BINS, HIST_STRIPES, histogram_scores
from submit.errors import SubmitError

REFERENCE_MAP = 28.0  # issue 6: plain ResNet-18 from scratch, InfoNCE, 15 minutes (not re-measured here)
REFERENCE_RANK1 = 43.0


def seed_spec(spec_path: str, seed: int, out: str, member: int | None = None,
              only: list[str] | None = None, training_from: list[str] | None = None) -> None:
    """Write the spec with train seeds offset by `seed` and recipe paths absolute (it may live elsewhere);
    `member` keeps that member alone, `only` narrows its tune search to these keys, `training_from` takes
    each member's train.overrides from the tuned spec holding the same run."""
    spec_file = Path(spec_path).resolve()
    data = yaml.safe_load(spec_file.read_text())
    notes = [f"train seeds + {seed}"]
    header: list[str] = []
    if member is not None:
        if not 0 <= member < len(data["members"]):
            _refuse(f"{spec_path}: no member {member} (it has {len(data['members'])})")
        data["members"] = data["members"][member:member + 1]
        notes.append(f"its member {member} alone")
    for tuned in training_from or []:
        header += _take_training(data["members"], tuned)
        notes.append(f"the training chosen in {tuned}")
    if only:
        data["tune"] = {"only": only}
        notes.append("its tune search narrowed to " + ", ".join(only))
    for member in data["members"]:
        if member.get("recipe"):  # a zero-shot member names its recipe directly
            member["recipe"] = str((spec_file.parent / member["recipe"]).resolve())
        train = member.get("train")
        if train:
            train["recipe"] = str((spec_file.parent / train["recipe"]).resolve())
            train["seed"] = int(train.get("seed") or 0) + seed
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {spec_file.name} with {'; '.join(notes)}", *header]
    Path(out).write_text("\n".join(lines) + "\n" + yaml.safe_dump(data, sort_keys=False))


def _refuse(line: str) -> NoReturn:
    """Bad input: one line on stderr, exit status 2, nothing written."""
    print(f"error: {line}", file=sys.stderr)
    sys.exit(2)


def _take_training(members: list[dict], tuned_path: str) -> list[str]:
    """Copy the train.overrides of `tuned_path`'s members onto the members with the same run; its training
    comment lines, each led by the runs they are for."""
    text = Path(tuned_path).read_text()
    chosen = {m["run"]: m["train"].get("overrides", []) for m in yaml.safe_load(text)["members"] if m.get("train")}
    matched = [m for m in members if m.get("run") in chosen and m.get("train")]
    if not matched:
        _refuse(f"{tuned_path}: none of its members' runs ({', '.join(chosen)}) is a trained member of the spec")
    for m in matched:
        m["train"]["overrides"] = list(chosen[m["run"]])
    names = ", ".join(Path(m["run"]).name for m in matched)  # its lines say members[0]: the study's own spec
    return [f"# {names}: {line[2:]}" for line in text.splitlines() if line.startswith("# training")]


def link_runs(spec_path: str, runs_dir: str, dirs: list[str]) -> None:
    """Symlink RUNS_DIR/NAME to the first DIR/NAME trained with exactly the member's recipe (recipe.yaml)."""
    from submit import config
    from submit.ensembling import load_spec, member_recipe
    from submit.recipe import Recipe

    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    spec = load_spec(spec_path, runs_dir, require_runs=False)
    for member in spec.members:
        if member.train is None or Path(member.run or "").exists():
            continue
        want = config.to_mapping(member_recipe(member, spec_path))
        name = Path(member.run or "").name
        for folder in dirs:
            done = Path(folder) / name
            if (done / "last.pt").is_file() and config.to_mapping(config.load(Recipe, done / "recipe.yaml")) == want:
                Path(member.run or "").symlink_to(done.resolve(), target_is_directory=True)
                print(f"{member.run}: the finished run {done}")
                break


# The paper's table: (row label, stage of the ablation spec's predict; None = the ensemble's final stage).
PAPER_ROWS = (
    ("zero-shot: ImageNet MobileNetV2 features, no fine-tuning", "zero-shot"),
    ("scratch: same architecture, input size and budget, random weights", "scratch"),
    ("pre-trained + InfoNCE (models/cpu-pretrained.yaml)", "pre-trained + InfoNCE"),
    ("pre-trained + batch-hard triplet, same budget", "pre-trained + triplet"),
    ("pre-trained + InfoNCE, + flip TTA", "pre-trained + InfoNCE, flip TTA"),
    ("pre-trained + InfoNCE, + flip TTA + PCA whitening (256, fitted on train)",
     "pre-trained + InfoNCE, flip TTA + PCA-whiten"),
    ("pre-trained + InfoNCE, + flip TTA + whitening + DBA + QE + re-ranking",
     "pre-trained + InfoNCE, flip TTA + PCA-whiten + DBA + QE + re-rank"),
    ("ensemble: ensembles/cpu-real.yaml", None),
)


def spec_scores(spec: Path, data_dir: str, runs: Path) -> dict:
    """predict's result for a spec on the test split (features come from the cache when present)."""
    from submit.predict import predict

    with tempfile.TemporaryDirectory() as tmp:
        return predict(spec, data_dir, "test", Path(tmp) / "test.csv", runs_dir=runs, progress=False)


def seed_scores(seed_dir: Path, data_dir: str) -> tuple[dict, dict]:
    """Stage scores of one seed's ensemble on the test split, and its timings (train per member, predict);
    with an ablation.yaml beside it, its stages too (under `ablation`)."""
    result = spec_scores(seed_dir / "spec.yaml", data_dir, seed_dir / "runs")
    if (seed_dir / "ablation.yaml").is_file():
        try:
            result["ablation"] = spec_scores(seed_dir / "ablation.yaml", data_dir, seed_dir / "runs")["scores"]
        except SubmitError as exc:  # its models are not all trained (an interrupted benchmark)
            print(f"note: {seed_dir.name}: ablation rows left out ({exc})", file=sys.stderr)
    times = json.loads((seed_dir / "times.json").read_text()) if (seed_dir / "times.json").is_file() else {}
    for run in sorted((seed_dir / "runs").iterdir()):
        metrics = run / "metrics.json"
        if metrics.is_file():
            history = json.loads(metrics.read_text())["history"]
            times[f"{run.name}: epochs, without validation"] = sum(row["seconds"] for row in history)
    return result, times


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _machine() -> str:
    from submit.device import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"


def paper_table(results: list[tuple[dict, dict]], hist: dict) -> list[str]:
    """The paper's table in miniature: one row per model/step, mean and spread over the seeds that have it
    (seed dirs without ablation.yaml give the ensemble row only), each row against the histogram."""
    ablated = [r for r, _ in results if "ablation" in r]
    if not ablated:
        return []
    lines = ["| row (test split, 50 queries x 255 gallery) | seeds | mAP | rank-1 | mINP | mAP / histogram |",
             "| --- | ---: | ---: | ---: | ---: | ---: |",
             f"| colour histogram ({HIST_STRIPES} stripes, HSV {'x'.join(map(str, HIST_BINS))}), measured in this run "
             f"| - | {hist['mAP']:.2f} | {hist['rank1']:.2f} | {hist['mINP']:.2f} | 1.00x |"]
    for label, stage in PAPER_ROWS:
        found = [r["scores"][next(reversed(r["scores"]))] for r, _ in results] if stage is None else \
            [r["ablation"][stage] for r in ablated if stage in r["ablation"]]
        if not found:
            continue
        cols = [[100 * f[k] for f in found] for k in ("mAP", "rank1", "mINP")]
        bold = "**" if stage is None else ""
        lines.append(f"| {bold}{label}{bold} | {len(found)} | {bold}{_cell(cols[0])}{bold} | {_cell(cols[1])} "
                     f"| {_cell(cols[2])} | {statistics.mean(cols[0]) / hist['mAP']:.2f}x |")
    return lines + [""]


def table(out_dir: str, data_dir: str, seed_dirs: list[str]) -> str:
    """The markdown results for every seed dir; also written to OUT_DIR/results.md."""
    results = [seed_scores(Path(d), data_dir) for d in seed_dirs]
    hist = {k: 100 * v for k, v in histogram_scores(data_dir).items()}
    stages = list(results[0][0]["scores"])
    lines = [f"machine: {_machine()}; date {time.strftime('%Y-%m-%dT%H:%M:%S')}; "
             f"load average {os.getloadavg()[0]:.1f}; seeds: {len(results)}", "",
             *paper_table(results, hist),
             f"ensemble stages; post-processing: {results[0][0]['postprocess']}", "",
             "| stage (test split, 50 queries x 255 gallery) | mAP | rank-1 | mINP | mAP / histogram | mAP / 28 |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for stage in stages:
        cols = [[100 * r["scores"][stage][k] for r, _ in results if stage in r["scores"]]
                for k in ("mAP", "rank1", "mINP")]
        mean_map = statistics.mean(cols[0])
        bold = "**" if stage == stages[-1] else ""
        lines.append(f"| {bold}{stage}{bold} | {bold}{_cell(cols[0])}{bold} | {_cell(cols[1])} | {_cell(cols[2])} "
                     f"| {mean_map / hist['mAP']:.2f}x | {mean_map / REFERENCE_MAP:.2f}x |")
    lines.append(f"| reference measured in this run: colour histogram ({HIST_STRIPES} stripes, HSV "
                 f"{'x'.join(map(str, HIST_BINS))}) | {hist['mAP']:.2f} | {hist['rank1']:.2f} | {hist['mINP']:.2f} "
                 f"| 1.00x | {hist['mAP'] / REFERENCE_MAP:.2f}x |")
    lines.append("| reference (issue 6 figure, not re-measured): plain ResNet-18, InfoNCE, 15 min "
                 f"| {REFERENCE_MAP:.2f} | {REFERENCE_RANK1:.2f} | - | - | 1.00x |")
    lines += ["", "| time (s) | " + " | ".join(f"seed dir {Path(d).name}" for d in seed_dirs) + " |",
              "| --- |" + " ---: |" * len(seed_dirs)]
    keys = list(dict.fromkeys(k for _, t in results for k in t))
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(f"{t.get(key, float('nan')):.0f}" for _, t in results) + " |")
    text = "\n".join(lines) + "\n"
    Path(out_dir, "results.md").write_text(text)
    return text


def tune_table(out_dir: str, seed_dirs: list[str]) -> str:
    """Hand-chosen vs tuned spec on the test split (scores of the same trained runs), mean ± sd over seeds."""
    rows = {v: [json.loads((Path(d) / f"{v}-score.json").read_text()) for d in seed_dirs] for v in ("hand", "tuned")}
    header = [line for line in Path(out_dir, "tuned.yaml").read_text().splitlines() if line.startswith("#")]
    lines = [f"machine: {_machine()}; date {time.strftime('%Y-%m-%dT%H:%M:%S')}; "
             f"load average {os.getloadavg()[0]:.1f}; seeds: {len(seed_dirs)}", "", *header, "",
             "| spec (test split, 50 queries x 255 gallery) | seeds | mAP | rank-1 | mINP |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, scores in rows.items():
        cols = [[100 * r[k] for r in scores] for k in ("mAP", "rank1", "mINP")]
        lines.append(f"| {name} | {len(scores)} | " + " | ".join(_cell(c) for c in cols) + " |")
    diff = [100 * (t["mAP"] - h["mAP"]) for h, t in zip(rows["hand"], rows["tuned"])]
    lines += ["", f"tuned - hand, per seed (mAP points): {', '.join(f'{d:+.2f}' for d in diff)}"]
    text = "\n".join(lines) + "\n"
    Path(out_dir, "results.md").write_text(text)
    return text


def main(argv: list[str]) -> None:
    if len(argv) >= 4 and argv[0] == "spec":
        parser = argparse.ArgumentParser(prog="real_table.py spec", usage=__doc__)
        parser.add_argument("--member", type=int)
        parser.add_argument("--only", nargs="+")
        parser.add_argument("--training-from", nargs="+")
        options = parser.parse_args(argv[4:])
        seed_spec(argv[1], int(argv[2]), argv[3], member=options.member, only=options.only,
                  training_from=options.training_from)
    elif len(argv) >= 4 and argv[0] == "link":
        link_runs(argv[1], argv[2], argv[3:])
    elif len(argv) >= 3 and argv[0] == "tune":
        print(tune_table(argv[1], argv[2:]), end="")
    elif len(argv) >= 4 and argv[0] == "table":
        print(table(argv[1], argv[2], argv[3:]), end="")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
