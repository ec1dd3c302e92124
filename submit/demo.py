"""The embedded demo: the whole competition flow on synthetic players, offline, on a CPU, in minutes.

synthetic zip -> prepare -> train the demo ensemble's members -> predict test and challenge -> evaluate.
Every step is the same library call a real entry makes; only the data and the model sizes are small.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from submit import ensembling, evaluation, predict, prepare, synthetic, training
from submit.errors import SubmitError

DEMO_SPEC = "demo"


def run_demo(out_dir: str | Path, players: int = 72, seed: int = 0, device: str | None = None,
             spec: str | Path = DEMO_SPEC, progress: bool = True, log: Callable[[str], object] = print) -> dict:
    """Run the demo into `out_dir` with ensemble `spec`; returns the test scores, timings and paths written.

    Re-running reuses what is there: finished runs are not retrained, features come from the cache.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SubmitError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    log(f"[1/5] synthetic players ({players}, seed {seed}) in the official zip layout")
    zip_path = synthetic.make_dataset(out / "synthetic.zip", players=players, seed=seed, as_zip=True)
    data_dir = out / "data"
    log(f"[2/5] prepare {zip_path.name} -> {data_dir}")
    prepared = prepare.prepare(zip_path, data_dir, force=True, progress=progress)
    timings["prepare"] = time.perf_counter() - start

    log("[3/5] train the demo ensemble's members (tiny CNNs from scratch, CPU)")
    t = time.perf_counter()
    runs_dir = out / "runs"
    spec = ensembling.resolve_spec_path(spec)
    trained = training.train_members(spec, data_dir, runs_dir, device=device, progress=progress)
    timings["train"] = time.perf_counter() - t

    log("[4/5] predict: test split (scored at every stage) and challenge split")
    t = time.perf_counter()
    files = {}
    results = {}
    for split in ("test", "challenge"):
        files[split] = out / f"{split}.csv"
        results[split] = predict.predict(spec, data_dir, split, files[split], device=device,
                                         runs_dir=runs_dir, progress=progress)
    timings["predict"] = time.perf_counter() - t

    log("[5/5] evaluate the written files as the organisers would")
    scores = evaluation.evaluate_file(files["test"], data_dir)
    challenge = evaluation.evaluate_file(files["challenge"], data_dir)
    timings["total"] = time.perf_counter() - start
    return {"data_dir": str(data_dir), "manifest": str(prepared.manifest), "runs": trained,
            "files": {k: str(v) for k, v in files.items()}, "predict_test": results["test"],
            "test": scores, "challenge": challenge, "timings": timings}
