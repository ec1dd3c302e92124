"""Where this process runs: its place in a torchrun job (rank, world size, the process group it joined, which
restart of the job this is), the objects every rank shares, the stop signals every rank agrees on, and how many
CPU compute threads it should use.

Signals: `StopSignals` turns SIGTERM, SIGUSR1 and a first SIGINT into a request that every rank reads at the
same step boundary through one all-reduce (`StopSignals.agreed`), so all ranks save and stop together and none
waits at a collective for a rank that left; a second SIGINT aborts at once (KeyboardInterrupt). `Stopped` is
what the training loop then raises; its `status` is the exit status, 128 + the signal's number.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import signal
import socket
import threading
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from submit.device import usable_cores
from submit.errors import SubmitError

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")  # what makes `train` save last.pt and stop at a step boundary
_handling = 0  # how many StopSignals blocks hold the handlers now (forked children are shielded meanwhile)


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """This process's place in the job; `owns_group` when `train` created the process group."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the torchrun job described by WORLD_SIZE/RANK/LOCAL_RANK (nccl on CUDA, gloo on CPU), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _restart_store()
        if store is None:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    return DistInfo(dist.get_world_size(), dist.get_rank(), local, owns), device


def _restart_store() -> dist.Store | None:
    """The store for a restarted torchrun worker group: the launcher's own store, under a prefix of its own.

    torchrun's workers share their launcher's key-value store (TORCHELASTIC_USE_AGENT_STORE), and a restart
    reuses it with the keys of the workers it replaced: the previous group's peer addresses among them, so a
    new gloo group may read a dead peer's address and wait on it until its timeout (30 minutes), silently.
    Each restart of one launcher's group (TORCHELASTIC_RESTART_COUNT, the same for all its workers) takes the
    prefix `reident-submit/attempt_N`. With several launchers (GROUP_WORLD_SIZE > 1) the counts of their
    agents need not agree, so torch's own set-up is kept there. None when there is nothing to change.
    """
    attempt = restart_count()
    if attempt == 0 or int(os.environ.get("GROUP_WORLD_SIZE", "1")) != 1:
        return None
    store, _, _ = next(dist.rendezvous("env://"))
    return dist.PrefixStore(f"reident-submit/attempt_{attempt}", store)


def release_group(error: BaseException | None = None) -> None:
    """Destroy the process group this process created, so that nothing of it (its gloo threads) outlives the call.

    `dist.destroy_process_group` only drops the group from torch's tables; the group lives on while anything
    holds it: DistributedDataParallel's reducer does, and the trainer that holds DDP may sit in a reference cycle
    or in the frames of `error`'s traceback until the interpreter exits. A gloo group alive then aborts the
    process now and then after every file is written: its worker thread, freeing the last collective's work,
    drops the Python object of a tensor, asks a finalizing interpreter for the GIL, is ended by pthread_exit
    inside a noexcept destructor, and std::terminate raises SIGABRT (issue 24). So the frames of `error`'s
    traceback drop their locals and a garbage collection frees any cycle before the group is destroyed.
    """
    if error is not None:
        traceback.clear_frames(error.__traceback__)
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def restart_count() -> int:
    """How many times torchrun restarted this job's workers (TORCHELASTIC_RESTART_COUNT; 0 outside torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def launch_id() -> str | None:
    """What tells this torchrun job from any other, the same across its restarts: its rendezvous id
    (TORCHELASTIC_RUN_ID) when it names one, else (torchrun's default id is 'none') the launcher itself: host,
    pid and start time of this worker's parent. None outside torchrun."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if run is None:
        return None
    if run and run != "none":
        return run
    parent = os.getppid()
    try:  # /proc/PID/stat field 22: the start time, so a reused pid is another launcher
        started = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "?"
    return f"{socket.gethostname()}:{parent}:{started}"


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (`[obj]` in a single process)."""
    if info.world_size == 1:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def cpu_threads(device: torch.device, workers: int) -> int:
    """On CPU, pick the compute threads: the cores this process may use, minus one per DataLoader worker
    and minus the cores other programs keep busy (1-minute load average), at least 1.

    OpenMP threads spin at barriers: when a loader worker or another program preempts one of them, a
    step can take many times longer (on a busy 2-core VM, 2 threads ran 27x slower than 1). An explicit
    OMP_NUM_THREADS always wins.
    """
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    busy = int(os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else 0
    torch.set_num_threads(max(1, min(cores - workers, cores - busy)))
    return torch.get_num_threads()


class Stopped(SubmitError):
    """Training saved last.pt at a step boundary and stopped because of a signal. `status` is the process's exit
    status (128 + the signal's number: 143 for SIGTERM, 138 for SIGUSR1, 130 for SIGINT); `main` says whether
    this rank is the one that reports it."""

    def __init__(self, signum: int, step: int, main: bool = True) -> None:
        self.signum, self.step, self.main = signum, step, main
        self.status = 128 + signum
        super().__init__(f"{self.what}; resume with --resume auto")

    @property
    def what(self) -> str:
        """What happened, without the advice: 'stopped by SIGTERM at step 75'."""
        return f"stopped by {signal.Signals(self.signum).name} at step {self.step}"


class StopSignals:
    """While entered (in the main thread), SIGTERM, SIGUSR1 and a first SIGINT only note a stop request; a
    second SIGINT raises KeyboardInterrupt (abort). The previous handlers come back on exit.

    A process forked meanwhile (a DataLoader worker: training's or validation's) blocks the stop signals
    (`_shield_forked_child`), so a signal sent to the whole process group (torchrun's killpg, a terminal's
    Ctrl-C) leaves it running until the loop that owns it stops it.
    """

    def __init__(self) -> None:
        self.received = 0  # the first stop signal's number, 0 while none came
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        global _handling
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    self._previous[number] = signal.signal(number, self._note)
            _handling += 1
        return self

    def __exit__(self, *exc: object) -> None:
        global _handling
        if self._previous:
            _handling -= 1
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if not self.received:
            self.received = signum
        if signum == signal.SIGINT:  # the next Ctrl-C aborts instead of waiting for the step boundary
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def agreed(self, info: DistInfo, device: torch.device) -> int:
        """The signal every rank stops for now (the highest number any rank received; 0 to go on): one
        all-reduce of one number per call, so every rank must call it at the same step."""
        if info.world_size == 1:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def _shield_forked_child() -> None:
    """In a child forked while `StopSignals` holds the handlers (a DataLoader worker, training's or validation's):
    the stop signals are blocked, and a thread ends the child on a SIGTERM from its parent only.

    torch makes any other sender's SIGTERM fatal in a loader worker, and a worker ends on KeyboardInterrupt, so a
    signal sent to the whole process group (torchrun's killpg, a terminal's Ctrl-C) or to every process of a job
    (a scheduler's) would end the workers, and the loop would fail on its next batch instead of saving; the loop
    shuts its workers down itself. The parent's SIGTERM (multiprocessing terminating its daemonic children,
    at exit among others) still ends the child at once, as torch's own handler does. subprocess's fork-and-exec
    runs no at-fork callback (unless given a preexec_fn), so programs started meanwhile keep the default mask."""
    if not _handling:
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, [getattr(signal, name) for name in STOP_SIGNALS])
    parent = os.getppid()

    def watch() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=watch, name="stop-signal-shield", daemon=True).start()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_shield_forked_child)
