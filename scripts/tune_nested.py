"""Does a tuned choice carry over to identities it was not chosen on? A nested check over the folds of a finished
`reident-submit tune` run (issue 22): for each fold, search on the other folds only (the same space and sampler,
on the features tune cached: nothing is trained or embedded again), then score the values chosen there on the
left-out fold, beside the spec as written. A gain that holds on the left-out folds is a property of the settings;
one that does not is the search fitting its own queries.

    python scripts/tune_nested.py SPEC WORK_DIR [TRIALS]

WORK_DIR is the `tune --work` folder (folds/, runs/ with each fold's members trained); TRIALS per search
(default 100). Writes WORK_DIR/nested.db (one study per left-out fold; a rerun continues them) and prints a
markdown table with the machine, the date and the load.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np

from submit import study, tune
from submit.ensembling import FUSIONS, load_spec, resolve_spec_path


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    spec_file, work = resolve_spec_path(argv[0]), Path(argv[1])
    trials = int(argv[2]) if len(argv) == 3 else 100
    dirs = sorted((work / "folds").iterdir())
    folds = [tune.prepare_fold(spec_file, d, work / "runs" / d.name, "cpu", 2, False) for d in dirs]
    base = load_spec(spec_file, runs_dir=".", require_runs=False)
    space = tune.search_space(base)
    every = {**space, **{key: p for rule in FUSIONS for key, p in tune.fusion_space(base, rule).items()}}
    print(f"machine: {os.uname().nodename}, {os.cpu_count()} cores; {datetime.datetime.now().isoformat()}; "
          f"load {os.getloadavg()[0]:.2f}; {trials} trials a search")
    print("\n| left-out fold | chosen on the others (their mean) | spec as written, left-out | chosen, left-out | "
          "gain | search |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    gains = []
    for k, (left, path) in enumerate(zip(folds, dirs)):
        assert left is not None
        others = [f for i, f in enumerate(folds) if i != k and f is not None]
        started = time.perf_counter()
        opened = study.open_study(f"sqlite:///{(work / 'nested.db').resolve()}", f"without-{path.name}",
                                  {"spec": str(spec_file.resolve()), "left_out": path.name}, 0, True)
        study.enqueue_first(opened, tune.spec_values(base), {**space, **tune.fusion_space(base, base.fusion)})
        study.optimise(opened, tune.objective(others, space), trials, 1, None)
        best = opened.best_trial
        hand = left.score(left.spec)
        chosen = left.score(tune.apply_values(left.spec, study.decode(best.params, every)))
        gains.append(chosen - hand)
        print(f"| {path.name} | {100 * best.value:.2f} | {100 * hand:.2f} | {100 * chosen:.2f} | "
              f"{100 * (chosen - hand):+.2f} | {time.perf_counter() - started:.0f} s |", flush=True)
    print(f"\nmean gain on the left-out folds: {100 * np.mean(gains):+.2f} ± {100 * np.std(gains):.2f} "
          f"(load {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
