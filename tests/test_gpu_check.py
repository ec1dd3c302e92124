"""scripts/gpu_check.sh on a machine without a GPU: its arguments, its plan, and its skip and refusal messages."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_help_and_plan():
    out = run("--help")
    assert out.returncode == 0 and "--budget SECONDS" in out.stdout and "Exit status" in out.stdout
    plan = run("--plan", "--python", sys.executable)
    assert plan.returncode == 0, plan.stderr
    text = plan.stdout
    assert "-m cuda" in text and "tests/test_precision.py tests/test_cuda.py" in text
    for model in ("vit-b-16-openai", "vit-l-14-openai"):
        assert f"models/{model}.yaml --device cuda --precision bf16 --random-weights" in text
    assert "--models vit-b-16 vit-l-14" in text and "budget 480 s" in text
    assert "scripts/bench_loader.py --device cuda" in text
    only_tests = run("--plan", "--no-bench").stdout
    assert "tests (" in only_tests and "bench_" not in only_tests


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown option '--bogus'"),
    (["--budget", "soon"], "--budget 'soon': expected whole seconds"),
    (["--budget", "10"], "--budget 10: expected at least 60 seconds"),
    (["--device", "tpu"], "--device 'tpu': expected cuda, cuda:N or cpu"),
    (["--python"], "--python needs a value"),
    (["--wheels", "/nonexistent/wheels"], "--wheels /nonexistent/wheels: not a folder"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, message):
    out = run(*args)
    assert out.returncode == 2 and out.stderr.startswith(f"gpu_check: {message}"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run")
def test_without_cuda_it_skips_with_a_reason_and_exit_3():
    out = run("--python", sys.executable)
    assert out.returncode == 3, out.stderr
    assert "gpu_check: skipped: no CUDA GPU visible" in out.stdout and "torch.cuda.is_available() is False" in out.stdout


def test_an_interpreter_without_the_packages_is_named(tmp_path):
    bare = tmp_path / "python"
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S -I \"$@\"\n")  # no site-packages: no torch
    bare.chmod(0o755)
    out = run("--python", str(bare))
    assert out.returncode == 2 and "missing Python packages" in out.stderr and "torch" in out.stderr


def test_cpu_rehearsal_runs_every_benchmark_and_fills_the_table(tmp_path):
    """`--device cpu --quick` runs the benchmark steps at toy size: each ends ok and its row carries figures."""
    out = run("--python", sys.executable, "--device", "cpu", "--quick", "--no-tests", "--logs", str(tmp_path),
              timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in out.stdout.splitlines() if line.startswith("| ")}
    assert set(rows) == {"check", "---", "train-tiny-test", "embed", "loader"}, out.stdout
    for name in ("train-tiny-test", "embed", "loader"):
        assert "| ok (" in rows[name], rows[name]
    assert "ratio" in rows["train-tiny-test"] and "img/s" in rows["embed"]
    assert "uint8 hand-over" in rows["loader"] and "ratio uint8 / float32" in rows["loader"]
