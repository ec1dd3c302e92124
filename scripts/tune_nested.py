"""Does a tuned choice carry over to identities it was not chosen on? A nested check over the folds of a finished
`reident-submit tune` run (issue 22): for each fold, search on the other folds only (the same space and sampler,
on the features tune cached: nothing is trained or embedded again), then score the values chosen there on the
left-out fold, beside the spec as written. A gain that holds on the left-out folds is a property of the settings;
one that does not is the search fitting its own queries.

    python scripts/tune_nested.py SPEC WORK_DIR [TRIALS]

WORK_DIR is the `tune --work` folder (folds/, runs/ with each fold's members trained); TRIALS per search
(default 100). Writes WORK_DIR/nested.db (one study per left-out fold; a rerun continues them) and prints a
markdown table with the machine, the date and the load. `reident-submit tune --nested` runs the same check
(`tune.nested_check`) with the main search's --trials, right after it.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

from submit import tune
from submit.ensembling import load_spec, resolve_spec_path


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
    print(f"machine: {os.uname().nodename}, {os.cpu_count()} cores; {datetime.datetime.now().isoformat()}; "
          f"load {os.getloadavg()[0]:.2f}; {trials} trials a search")
    started = time.perf_counter()
    rows = tune.nested_check([f for f in folds if f is not None], dirs, base, space,
                             f"sqlite:///{(work / 'nested.db').resolve()}", "without", {"spec": str(spec_file)},
                             trials, 1, None, 0, True)
    print("\n| left-out fold | chosen on the others (their mean) | spec as written, left-out | chosen, left-out | "
          "gain |\n| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row.fold} | {100 * row.on_others:.2f} | {100 * row.spec:.2f} | {100 * row.chosen:.2f} | "
              f"{100 * (row.chosen - row.spec):+.2f} |")
    print(f"\n{tune.nested_text(rows)}\n{time.perf_counter() - started:.0f} s, load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
