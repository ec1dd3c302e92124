"""Training on a cluster (issue 24): `--resume auto`, preemption signals, torchrun's elastic restarts, and a clean
exit of every rank (no gloo thread left when `train` returns). CPU, gloo, torchrun subprocesses, tiny recipe.

The interrupted runs are interrupted from inside, at a fixed step (a worker kills itself with SIGKILL, or sends
SIGTERM to its launcher, or to itself), so nothing waits on a clock; each is compared with an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from submit import training
from submit.cli import main
from submit.distributed import DistInfo, Stopped, StopSignals
from submit.errors import SubmitError
from submit.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny-test.yaml"
STEPS = 8  # the 2-process runs: 13 steps per epoch at 8 pairs, so every interruption lands mid-epoch
GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")

# Each rank runs the real CLI; ACTION "kind:rank:step" acts in the first attempt at that step (after the step's
# checkpoint, if any): kill9 (the rank kills itself), term-launcher (SIGTERM to torchrun, its parent, then the
# rank polls until torchrun has passed the signal on, so all ranks stop at that step).
# When the command ends, the rank records the names of its threads: no gloo thread may outlive `train`.
RANK_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, time
    import torch
    torch.set_num_threads(1)
    from submit import training
    from submit.cli import main

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank = int(os.environ["RANK"])
    kind, who, at = (os.environ.get("ACTION") or "none:-1:0").split(":")

    def on_step(self, step):
        print(f"rank {rank} attempt {attempt} step {step}", flush=True)
        if attempt == 0 and rank == int(who) and step == int(at):
            if kind == "kill9":
                os.kill(os.getpid(), signal.SIGKILL)
            elif kind == "term-launcher":  # and wait until torchrun has passed it on: every rank stops here
                os.kill(os.getppid(), signal.SIGTERM)
                deadline = time.monotonic() + 120
                while not self.signals.received and time.monotonic() < deadline:
                    time.sleep(0.01)

    training._Trainer.on_step = on_step
    try:
        main(sys.argv[2:], standalone_mode=False)
    finally:
        names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
        with open(os.path.join(sys.argv[1], f"threads-{attempt}-{rank}.json"), "w") as fh:
            json.dump(names, fh)
""")


def tiny(*overrides: str):
    return training.apply_overrides(load_recipe(TINY), ["data.workers=0", "train.checkpoint_every=0", *overrides])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun_command(tmp: Path, data_dir: Path, out: Path, launch: list[str], extra: tuple[str, ...]) -> list[str]:
    """torchrun with `launch` options running `train` through RANK_SCRIPT (records under `tmp`)."""
    script = tmp / "rank.py"
    script.write_text(RANK_SCRIPT)
    return [sys.executable, "-m", "torch.distributed.run", *launch, str(script), str(tmp),
            "train", str(TINY), "--data", str(data_dir), "--out", str(out), "--device", "cpu",
            "--set", "data.workers=0", "--set", "train.pairs_per_batch=4", "--set", "train.checkpoint_every=2",
            "--max-steps", str(STEPS), *extra]


def _torchrun(tmp: Path, data_dir: Path, out: Path, *extra: str, action: str = "", restarts: int = 0,
              standalone: bool = True) -> subprocess.CompletedProcess:
    """One launcher, 2 gloo workers running `train`."""
    launch = (["--standalone"] if standalone else  # the default static rendezvous: what a plain `torchrun` uses
              ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())])
    cmd = _torchrun_command(tmp, data_dir, out, [*launch, "--nproc-per-node", "2", "--max-restarts", str(restarts)],
                            extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACTION": action}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)


def _gloo_threads_left(tmp: Path) -> dict[str, list[str]]:
    records = {p.name: json.loads(p.read_text()) for p in sorted(tmp.glob("threads-*.json"))}
    assert records, "no rank recorded its threads"
    return {name: [t for t in threads if t in GLOO_THREADS] for name, threads in records.items()
            if any(t in GLOO_THREADS for t in threads)}


def _assert_same_weights(a_path: Path, b_path: Path, tolerance: float = 1e-6) -> None:
    a = torch.load(a_path, weights_only=True)
    b = torch.load(b_path, weights_only=True)
    assert a["state"]["step"] == b["state"]["step"] == STEPS
    worst = max(float((a["model"][k] - b["model"][k]).abs().max()) for k in b["model"])
    worst = max(worst, float((a["temperature"]["log_scale"] - b["temperature"]["log_scale"]).abs()))
    assert worst <= tolerance, worst


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, players) -> Path:
    return players(tmp_path_factory.mktemp("data"), seed=3)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir) -> Path:
    """last.pt of an uninterrupted 2-process run of STEPS steps (what every interrupted run must end with)."""
    tmp = tmp_path_factory.mktemp("straight")
    run = _torchrun(tmp, data_dir, tmp / "run")
    assert run.returncode == 0, run.stderr[-3000:]
    assert _gloo_threads_left(tmp) == {}  # the process group and its threads are gone when `train` returns
    return tmp / "run" / "last.pt"


# ---- --resume auto (one process) --------------------------------------------------------------------


def test_resume_auto_on_an_empty_a_half_finished_and_a_finished_run_folder(data_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert training.train(tiny(), data_dir, empty, resume="auto", max_steps=2, progress=False)["steps"] == 2
    assert training.train(tiny(), data_dir, tmp_path / "absent", resume="auto", max_steps=2,
                          progress=False)["steps"] == 2

    half = tmp_path / "half"  # stopped at step 3 of 6: auto continues it, to the weights of a run never stopped
    training.train(tiny(), data_dir, half, max_steps=3, progress=False)
    assert training.train(tiny(), data_dir, half, resume="auto", max_steps=6, progress=False)["steps"] == 6
    training.train(tiny(), data_dir, tmp_path / "straight", max_steps=6, progress=False)
    a = torch.load(half / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)

    done = tmp_path / "done"  # every epoch trained: auto has nothing to do and leaves the run as it is
    first = training.train(tiny("train.epochs=1"), data_dir, done, progress=False)
    before = (done / "last.pt").read_bytes()
    again = training.train(tiny("train.epochs=1"), data_dir, done, resume="auto", progress=False)
    assert again["steps"] == first["steps"] and again["epochs"] == 1
    assert (done / "last.pt").read_bytes() == before
    with pytest.raises(SubmitError, match="train.lr"):  # a refusal holds under auto too
        training.train(tiny("train.epochs=1", "train.lr=0.5"), data_dir, done, resume="auto", progress=False)
    with pytest.raises(SubmitError, match="resume="):
        training.train(tiny(), data_dir, done, resume="maybe", progress=False)  # type: ignore[arg-type]


def test_cli_resume_takes_auto_or_no_value(data_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    base = ["train", str(TINY), "--data", str(data_dir), "--out", str(out), "--set", "data.workers=0",
            "--device", "cpu"]
    first = runner.invoke(main, [*base, "--max-steps", "2", "--resume", "auto"])  # nothing there: a new run
    assert first.exit_code == 0, first.output
    bare = runner.invoke(main, [*base, "--resume", "--max-steps", "3"])  # bare: continue last.pt
    assert bare.exit_code == 0, bare.output
    assert "resumed at step 2" in bare.output
    assert torch.load(out / "last.pt", weights_only=True)["state"]["step"] == 3
    fresh = runner.invoke(main, [*base, "--max-steps", "4"])
    assert fresh.exit_code == 2 and "--resume auto" in fresh.output
    bad = runner.invoke(main, [*base, "--resume", "later"])
    assert bad.exit_code == 2 and "'auto'" in bad.output and len(bad.output.strip().splitlines()) == 1


# ---- signals (one process) -------------------------------------------------------------------------


SIGNALLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from submit import training
    from submit.cli import main

    group = sys.argv[2].startswith("group:")  # to the whole process group: this process and its loader workers
    signals = [getattr(signal, name) for name in sys.argv[2].removeprefix("group:").split(",")]

    def on_step(self, step):
        if step == int(sys.argv[1]):
            for number in signals:
                if group:
                    os.killpg(os.getpgid(0), number)
                else:
                    os.kill(os.getpid(), number)

    training._Trainer.on_step = on_step
    main(sys.argv[3:])
""")


@pytest.mark.parametrize("name,workers", [("SIGTERM", 0), ("SIGUSR1", 0), ("SIGINT", 0), ("group:SIGTERM", 1),
                                          ("group:SIGINT", 1)])
def test_a_stop_signal_saves_last_pt_at_the_step_boundary_and_exits_with_128_plus_its_number(
        data_dir, tmp_path, name, workers):
    """`group:` sends it to the process group, the loader worker too (as torchrun's killpg or a terminal does)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", SIGNALLED_RUN, "3", name, "train", str(TINY), "--data", str(data_dir), "--out",
           str(out), "--device", "cpu", "--set", f"data.workers={workers}", "--set", "train.checkpoint_every=0"]
    run = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300, start_new_session=True)  # its own process group: pytest's is never hit
    name = name.removeprefix("group:")
    number = getattr(signal, name)
    assert run.returncode == 128 + number, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("stopped by")]
    assert lines == [f"stopped by {name} at step 3; resume with --resume auto"]
    assert torch.load(out / "last.pt", weights_only=True)["state"]["step"] == 3
    assert not list(out.glob(".*tmp"))  # nothing half-written


def test_a_second_sigint_aborts_without_saving(data_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", SIGNALLED_RUN, "3", "SIGINT,SIGINT", "train", str(TINY), "--data", str(data_dir),
           "--out", str(out), "--device", "cpu", "--set", "data.workers=0", "--set", "train.checkpoint_every=0"]
    run = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300, start_new_session=True)
    assert run.returncode == 130 and "error: interrupted" in run.stderr, run.stderr[-2000:]
    assert "stopped by" not in run.stderr and not (out / "last.pt").exists()


def test_stop_signals_are_restored_and_a_single_process_agrees_with_itself():
    before = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    with StopSignals() as signals:
        assert signals.agreed(DistInfo(), torch.device("cpu")) == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.agreed(DistInfo(), torch.device("cpu")) == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGINT)  # noted only: the first signal is the one reported
        assert signals.received == signal.SIGUSR1
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C aborts
    assert {number: signal.getsignal(number) for number in before} == before
    stopped = Stopped(signal.SIGTERM, 7)
    assert stopped.status == 143 and str(stopped) == "stopped by SIGTERM at step 7; resume with --resume auto"


# ---- torchrun: preemption, elastic restarts, clean exits ------------------------------------------------


def test_sigterm_to_the_launcher_then_resume_auto_ends_like_an_uninterrupted_run(data_dir, straight, tmp_path):
    out = tmp_path / "run"
    # with a loader worker per rank: torchrun's SIGTERM reaches the workers' process groups too
    stopped = _torchrun(tmp_path, data_dir, out, "--set", "data.workers=1", action="term-launcher:0:3")
    assert stopped.returncode != 0
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1, stopped.stderr[-3000:]  # one line, from rank 0
    step = torch.load(out / "last.pt", weights_only=True)["state"]["step"]
    assert step == 3 and lines[0] == "stopped by SIGTERM at step 3; resume with --resume auto"
    assert _gloo_threads_left(tmp_path) == {}

    resumed = _torchrun(tmp_path, data_dir, out, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at step {step}" in resumed.stderr
    _assert_same_weights(out / "last.pt", straight)
    assert _gloo_threads_left(tmp_path) == {}


def test_an_elastic_restart_after_kill_9_finishes_like_an_uninterrupted_run(data_dir, straight, tmp_path):
    """A plain `torchrun --max-restarts 1` (static rendezvous, the launcher's store reused by the restart): rank 1
    dies by SIGKILL after the step-4 checkpoint; torchrun restarts both workers, which continue from last.pt."""
    out = tmp_path / "run"
    run = _torchrun(tmp_path, data_dir, out, action="kill9:1:5", restarts=1, standalone=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 0 attempt 1 step 5" in run.stdout and "rank 0 attempt 1 step 4" not in run.stdout
    assert "resumed at step 4" in run.stderr
    _assert_same_weights(out / "last.pt", straight)
    assert _gloo_threads_left(tmp_path) == {}


def test_a_restart_into_another_jobs_run_is_still_refused(data_dir, tmp_path, monkeypatch):
    """TORCHELASTIC_RESTART_COUNT > 0 resumes only the last.pt that this torchrun job wrote."""
    out = tmp_path / "run"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    training.train(tiny(), data_dir, out, max_steps=2, progress=False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert training.train(tiny(), data_dir, out, max_steps=3, progress=False)["steps"] == 3  # job a's restart
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    with pytest.raises(SubmitError, match="already holds a run"):
        training.train(tiny(), data_dir, out, max_steps=4, progress=False)
    assert training.train(tiny(), data_dir, tmp_path / "new", max_steps=1, progress=False)["steps"] == 1


def test_two_launchers_of_one_process_each_end_like_one_launcher_with_two(data_dir, straight, tmp_path):
    """Multi-node on one machine: two torchrun launchers (c10d rendezvous, 1 process each) train the same run as
    one launcher with 2 processes; only global rank 0 writes the run folder."""
    out = tmp_path / "run"
    endpoint = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACTION": ""}
    launchers = [subprocess.Popen(_torchrun_command(tmp_path, data_dir, out, [
        "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes"], ()), env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    results = [launcher.communicate(timeout=400) for launcher in launchers]
    for launcher, (_, stderr) in zip(launchers, results):
        assert launcher.returncode == 0, stderr[-3000:]
    assert sum("global batch 8 pairs (2 process(es))" in stderr for _, stderr in results) == 1  # rank 0 only
    _assert_same_weights(out / "last.pt", straight)
    assert len(list((out / "tb").iterdir())) == 1  # one event writer
    assert _gloo_threads_left(tmp_path) == {}
