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
