"""The CLI's rendering edge: rich tables and lines for the typed results the library returns.

Library functions run silently and return dataclasses or dicts; `cli.py` parses options and calls them, and
these functions draw their results (rich is imported only when a command prints).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from submit.metrics import METRIC_KEYS, METRIC_LABELS

if TYPE_CHECKING:  # the library's result types, for the annotations only (nothing heavy imported to render)
    from submit.jersey import NumberScore
    from submit.preflight import Preflight
    from submit.prepare import PrepareResult
    from submit.runs import RunsTable
    from submit.tune import TuneResult
    from submit.weights import Need


def score_table(result: dict) -> Any:
    """`predict`'s ablation as a rich table: one row per stage (members, post-processing steps, fused)."""
    from rich.table import Table

    table = Table(title=f"{Path(result['spec']).name} on the {result['split']} split "
                        f"({result['shape'][0]} queries x {result['shape'][1]} gallery)",
                  caption=result["postprocess"])
    table.add_column("stage")
    for key in METRIC_KEYS:
        table.add_column(METRIC_LABELS[key], justify="right")
    labels = list(result["scores"])
    for i, label in enumerate(labels):
        s = result["scores"][label]
        cells = [f"{100 * s[k]:.2f}" for k in METRIC_KEYS]
        table.add_row(label, *cells, style="bold" if i == len(labels) - 1 else None)
    return table


def print_result(result: dict, console: Any) -> None:
    """`evaluate_file`'s result: a rich table of the metrics (percent), or the not-scorable message for a
    challenge file."""
    from rich.table import Table

    if not result["scored"]:
        console.print(result["message"])
        return
    table = Table(title=f"{Path(result['file']).name}: {result['split']} split, "
                        f"{result['num_valid_queries']}/{result['num_queries']} queries scored, "
                        f"{result['num_gallery']} gallery")
    table.add_column("metric")
    table.add_column("value (%)", justify="right")
    for key in METRIC_KEYS:
        table.add_row(key, f"{100 * result[key]:.2f}")
    console.print(table)


def print_prepared(result: PrepareResult) -> None:
    """`prepare`'s result: a table of images and identities per split and role, the release, notes and manifest."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result.layout} layout")
    for col in ("split", "role", "images", "identities"):
        table.add_column(col, justify="left" if col in ("split", "role") else "right")
    for row in result.summary:
        ids = "-" if row.identities is None else f"{row.identities:,}"
        table.add_row(row.split, row.role, f"{row.images:,}", ids)
    console = Console()
    console.print(table)
    for line in ([result.release] if result.release else []) + result.notes:
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"wrote {result.manifest}", highlight=False, soft_wrap=True)


def print_weights(needs: Sequence[Need]) -> None:
    """`weights list`: each target's backbone, weights, where they come from and whether they are cached."""
    from rich.console import Console
    from rich.table import Table

    from submit.weight_sources import cache_dir  # lazy for start-up: both import torch
    from submit.weights import hf_cache_dir

    table = Table(title="pre-trained weights")
    for col in ("recipe", "backbone", "pretrained", "from", "here"):
        table.add_column(col, overflow="fold")
    for need in needs:
        loc = need.location
        here = "-" if loc.kind == "none" else ("yes" if loc.path else "[red]missing[/red]")
        table.add_row(Path(need.target).stem if need.target.endswith(".yaml") else need.target, need.backbone,
                      loc.pretrained or "-", loc.origin, here)
    console = Console(width=max(Console().width, 140))
    console.print(table)
    console.print(f"caches: named sources {cache_dir()}, Hugging Face {hf_cache_dir()}", highlight=False,
                  soft_wrap=True)


def print_jersey(out: str, crops: int, score: NumberScore | None) -> None:
    """`jersey`: the file written, then (with ground truth) accuracy and the most common confusions."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"wrote {out} ({crops:,} crops)", highlight=False, soft_wrap=True)
    if score is None:
        return
    table = Table(title=f"shirt numbers vs truth ({score.n:,} crops)")
    for col in ("accuracy", "top-5", "read as none"):
        table.add_column(col, justify="right")
    table.add_row(f"{score.accuracy:.1%}", f"{score.top5:.1%}", f"{score.none_rate:.1%}")
    console.print(table)
    if score.confusions:
        conf = Table(title="most common confusions")
        for col in ("true", "predicted", "count"):
            conf.add_column(col, justify="right")
        for t, p, c in score.confusions:
            conf.add_row(str(t), "none" if p == -1 else str(p), str(c))
        console.print(conf)


def print_preflight(result: Preflight) -> None:
    """Render a `preflight.Preflight` with rich: one table, then the verdict, advice and notes."""
    from rich.console import Console
    from rich.table import Table

    gib = 1024 ** 3
    table = Table(title=f"dry run: {result.recipe} ({result.backbone})", show_header=False)
    rows = [("device", f"{result.device}, {result.precision}"), ("weights", result.weights),
            ("parameters", f"{result.params / 1e6:.1f} M ({result.trainable / 1e6:.1f} M trainable)"),
            ("batch", f"{result.pairs_per_batch} pairs x {result.accum_steps} accumulation, "
                      f"{result.image_size[0]}x{result.image_size[1]}, grad checkpointing "
                      f"{'on' if result.grad_checkpointing else 'off'}"),
            ("peak memory", f"{result.peak_memory / gib:.2f} GiB ({result.memory_kind}); weights+grads+AdamW "
                            f"{result.static_memory / gib:.2f} GiB"),
            ("speed", f"{result.seconds_per_step:.3f} s/step, {result.images_per_s:.1f} images/s "
                      f"({result.steps} step(s) timed)")]
    if result.total_steps is not None:
        rows.append(("whole recipe", f"{result.total_steps} steps, about {_duration(result.estimated_seconds)} "
                                     "(training steps only: validation and data loading not included)"))
    if result.budget is not None:
        rows.append(("fits", f"{'yes' if result.fits else 'NO'}: {result.needed_memory / gib:.2f} of "
                             f"{result.budget / gib:.2f} GiB"))
    for name, value in rows:
        table.add_row(name, value)
    console = Console(width=max(Console().width, 120))
    console.print(table)
    for line in result.advice:
        console.print(f"to fit: {line}", highlight=False, soft_wrap=True)
    for line in result.notes:
        console.print(f"note: {line}", highlight=False, soft_wrap=True)


def _duration(seconds: float | None) -> str:
    """`3 h 05 min` style for the wall-time estimate."""
    if seconds is None:
        return "?"
    minutes = int(round(seconds / 60))
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{max(seconds / 60, 0):.1f} min"


def print_demo(result: dict, console: Any) -> None:
    """`demo`'s result: the test split's stage table, then what was written and how long each stage took."""
    from rich.table import Table

    console.print(score_table(result["predict_test"]))
    table = Table(title="reident-submit demo")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    test = result["test"]
    table.add_row("test mAP / rank-1", f"{100 * test['mAP']:.2f} / {100 * test['rank1']:.2f} "
                  f"({test['num_valid_queries']} queries)")
    table.add_row("challenge file", f"{result['files']['challenge']} (valid; not scorable: no identities)")
    table.add_row("test file", result["files"]["test"])
    table.add_row("runs", ", ".join(r["run_dir"] for r in result["runs"]))
    table.add_row("data", result["data_dir"])
    table.add_row("time", ", ".join(f"{k} {v:.0f}s" for k, v in result["timings"].items()))
    console.print(table)


def print_runs(table: RunsTable, sort: str) -> None:
    """`runs`: one row per run (recipe, epochs, best and last scores, time, manifest), in `sort` order."""
    from rich.console import Console
    from rich.table import Table

    view = Table(title=f"{len(table.runs)} run(s), by {sort}")
    for col in ("run", "recipe", "backbone", "epochs", "best mAP", "best rank-1", "last mAP", "last rank-1",
                "train time", "manifest"):
        view.add_column(col, justify="left" if col in ("run", "recipe", "backbone", "manifest") else "right")
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    for r in table.runs:
        planned = "?" if r.epochs_planned is None else str(r.epochs_planned)
        view.add_row(r.name, r.recipe, r.backbone, f"{r.epochs_done}/{planned}", pct(r.best_mAP),
                     pct(r.best_rank1), pct(r.last_mAP), pct(r.last_rank1), f"{r.train_seconds:.0f}s",
                     (r.manifest or "-")[:12])
    Console(width=max(Console().width, 140)).print(view)


def _values_text(values: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def print_tune(result: TuneResult) -> None:
    """`tune`'s leading trials as a table, then the tuned spec, the folder and the held-out score."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"study {result.study}: {result.finished} finished trials ({result.complete} scored)")
    for column in ("trial", "held-out mAP", "spread", "values"):
        table.add_column(column, justify="right" if column != "values" else "left")
    for row in result.leaders:
        table.add_row(str(row["number"]), f"{100 * row['value']:.2f}", f"{100 * row['spread']:.2f}",
                      _values_text(row["params"]))
    console = Console()
    if result.train is not None:
        chosen = result.train
        console.print(f"training study {chosen.study}: {chosen.finished} finished trials "
                      f"({chosen.finished - chosen.complete} pruned); best #{chosen.number}: held-out mAP "
                      f"{100 * chosen.value:.2f} with {_values_text(chosen.values)}"
                      + (f"; the recipes as written: {chosen.own.text()}" if chosen.own else ""),
                      highlight=False, soft_wrap=True)
    console.print(table)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)
    if result.nested:
        console.print(result.nested_summary(), highlight=False, soft_wrap=True)
    folds = len(result.fold_values)
    own = f" (the spec as written: {result.own.text()})" if result.own else ""
    console.print(f"best trial #{result.best_trial}: held-out mAP {100 * result.best_value:.2f} over {folds} fold(s)"
                  f"{own}; "
                  f"wrote {result.out} and {result.work_dir} (trials.csv, {len(result.pictures)} pictures)",
                  highlight=False, soft_wrap=True)
