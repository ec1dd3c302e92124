"""The pre-flight (`train RECIPE --dry-run`) of every recipe in models/, one subprocess each, as a markdown table.

Each recipe runs in its own process (so the CPU peak resident set is that recipe's alone) with a time limit;
a recipe over the limit is listed as not measured. Weights are random unless cached (same size and speed).

    python scripts/dry_run_table.py [--device cpu] [--steps 2] [--timeout 600] [--threads 2] [RECIPE ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3


def one(recipe: str, device: str, steps: int) -> None:
    """Child mode: run the dry run of one recipe and print its result as one JSON line."""
    from submit.preflight import dry_run
    from submit.recipe import load_recipe

    result = dry_run(load_recipe(recipe), device=device, steps=steps)
    print("RESULT " + json.dumps(dataclasses.asdict(result)), flush=True)


def measure(recipe: Path, device: str, steps: int, timeout: float, threads: int) -> dict:
    """Run one recipe's dry run in a subprocess; the result dict, or {'error': why}."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, __file__, "--one", str(recipe), "--device", device, "--steps", str(steps)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"not measured: over the {timeout:.0f} s limit"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"failed: {tail[:160]}"}
    return {**json.loads(lines[-1][len("RESULT "):]), "wall": time.perf_counter() - start}


def row(name: str, result: dict) -> str:
    """One markdown table row."""
    if "error" in result:
        return f"| {name} | | | | | | {result['error']} |"
    batch = f"{result['pairs_per_batch']}x{result['accum_steps']} pairs, {result['image_size'][0]}x{result['image_size'][1]}"
    ckpt = ", ckpt" if result["grad_checkpointing"] else ""
    return (f"| {name} | {result['params'] / 1e6:.1f} M | {batch}{ckpt} | {result['precision']} | "
            f"{result['peak_memory'] / GIB:.2f} GiB | {result['seconds_per_step']:.2f} | "
            f"{result['images_per_s']:.1f} img/s, {result['steps']} step(s), {result['wall']:.0f} s wall |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", help="recipe files [default: every models/*.yaml]")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps per recipe (the first is warm-up)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per recipe before it is skipped")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each child")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.timeout <= 0 or args.threads < 1:
        parser.error("--steps, --timeout and --threads must be positive")
    if args.one:
        one(args.one, args.device, args.steps)
        return 0
    from submit.device import cpu_model

    recipes = [Path(r) for r in args.recipes] or sorted((REPO / "models").glob("*.yaml"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {args.threads} thread(s) per run, device {args.device}; "
          f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='minutes')}; "
          f"load average at start {load:.2f}\n", flush=True)
    print("| recipe | params | micro-batch x accumulation | precision | peak memory | s/step | notes |")
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for recipe in recipes:
        print(row(recipe.stem, measure(recipe, args.device, args.steps, args.timeout, args.threads)), flush=True)
    end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nload average at end {end:.2f}; CPU peak memory is the child process's peak resident set (torch "
          "included); s/step excludes the first (warm-up) step when 2 or more ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
