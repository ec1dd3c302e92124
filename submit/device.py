"""Device choice and mixed precision: CUDA + AMP by default, CPU fp32 unless bf16/fp16 is asked for; the cores.

torch is imported inside the functions that need it, so that torch-free stages (re-ranking, metrics) and
benchmark scripts can use `usable_cores` and `cpu_model` without its ~600 MiB of libraries.

CUDA-only by nature, so not run on CPU: pinned host memory (`pin_memory=` is on only for CUDA; it needs the CUDA
driver), `non_blocking=True` copies (a no-op for CPU tensors on CPU) and channels-last input in embedding (a
layout choice). tests/test_precision.py checks the flags are off on CPU; its `cuda`-marked tests run the
CUDA side (scripts/gpu_check.sh).
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Iterator

from submit.errors import SubmitError

if TYPE_CHECKING:
    import torch


def pick_device(requested: str | None = None) -> torch.device:
    """Return the requested device (checked: it must exist here), else CUDA when available, else CPU."""
    import torch

    if requested:
        return check_device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(requested: str | torch.device | None) -> torch.device | None:
    """The requested device if this machine has it; else one-line SubmitError (call before any work)."""
    if requested is None or requested == "":
        return None
    import torch

    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError, ValueError):
        raise SubmitError(f"--device {requested}: expected cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise SubmitError(f"--device {requested}: expected cpu, cuda or cuda:N (this toolkit runs on CPU or CUDA)")
    if not torch.cuda.is_available():
        raise SubmitError(f"--device {requested}: CUDA is not available on this machine; use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise SubmitError(f"--device {requested}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    return device


def amp_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `precision` ('auto', 'bf16', 'fp16', 'fp32'); None means no autocast.

    'bf16'/'fp16' are honoured on every device (CPU autocast too, so CI runs the GPU's precision paths);
    'auto' is bf16 (else fp16) on CUDA and fp32 on CPU, where autocast is slower than fp32 on most cores.
    """
    import torch

    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def precision_note(device: torch.device, precision: str) -> str | None:
    """A warning when `precision` asks for a half-precision autocast this CPU only emulates (slower than fp32):
    bf16 without AVX512-BF16 or AMX, fp16 without AMX-FP16. None on CUDA, for fp32/auto, or with native support."""
    import torch

    if device.type != "cpu" or precision not in ("bf16", "fp16"):
        return None
    def has(feature: str) -> bool:  # torch's private CPU probes; a torch without one is not second-guessed
        return bool(getattr(torch.cpu, f"_is_{feature}_supported", lambda: True)())

    native = has("avx512_bf16") or has("amx_tile") if precision == "bf16" else has("amx_fp16")
    if native:
        return None
    needs = "AVX512-BF16 or AMX" if precision == "bf16" else "AMX-FP16"
    return (f"train.precision {precision}: this CPU lacks {needs}, so {precision} autocast is emulated and may be "
            "slower than fp32; pass --set train.precision=fp32 to compare")


def needs_scaler(device: torch.device, precision: str = "auto") -> bool:
    """True when training in `precision` needs a gradient scaler (fp16 autocast: small gradients underflow)."""
    import torch

    return amp_dtype(device, precision) == torch.float16


@contextlib.contextmanager
def autocast(device: torch.device, precision: str = "auto") -> Iterator[None]:
    """Autocast in `amp_dtype(device, precision)` (CPU or CUDA); a no-op when that is None (fp32)."""
    import torch

    dtype = amp_dtype(device, precision)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (else platform's guess), for benchmark reports."""
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    """The number of cores this process may run on (its CPU affinity, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
