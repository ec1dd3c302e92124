"""`prepare`: turn a SOURCE (official zip or folder, Market-1501, folder-per-identity) into DATA_DIR.

DATA_DIR holds `manifest.csv` (see `submit.manifest`), the images under `images/` (mirroring the
source tree below its layout root, e.g. `images/reid_training/1_1_0.jpeg`) and, when the source has
one beside `data_reid/`, `numbers.csv` copied verbatim: its paths are relative to `data_reid/`, i.e. to
`DATA_DIR/images/`, so a manifest path is `images/` + a numbers.csv path.
Every image is decoded once (a corrupt crop fails here, not mid-training). DATA_DIR is built in a temp
folder beside it and renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import urllib.error
import urllib.request
import zipfile
import zlib
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from rich.progress import DownloadColumn, MofNCompleteColumn, Progress, ProgressColumn

from submit import atomic, layouts, locks
from submit.errors import SubmitError
from submit.manifest import COLUMNS, ROLES, SPLITS, write_manifest
from submit.progress import progress_bar

OFFICIAL_URL = ("https://github.com/DeepSportradar/player-reidentification-challenge/raw/master/"
                "baseline/data/synergyreid/raw/synergyreid_data.zip")
RELEASES = {  # md5 of synergyreid_data.zip -> release
    "05715857791e2e88b2f11e4037fbec7d": "2022",
    "2a1cdbd10d2b8f0da6575e3581343e31": "2023",
}


@dataclass(frozen=True)
class SummaryRow:
    """Images and identities of one split/role (identities None where unknown, as in the challenge)."""

    split: str
    role: str
    images: int
    identities: int | None


@dataclass(frozen=True)
class PrepareResult:
    """What `prepare` wrote and found, for the CLI to print."""

    data_dir: Path
    manifest: Path
    layout: str
    release: str | None  # one line on the zip's md5, None for a folder source
    summary: list[SummaryRow]
    notes: list[str]


def md5sum(path: str | Path) -> str:
    """The md5 hex digest of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def release_note(path: str | Path) -> str:
    """One line saying which official release a zip is, or that it is none of them."""
    md5 = md5sum(path)
    if md5 in RELEASES:
        return f"official {RELEASES[md5]} release of synergyreid_data.zip (md5 {md5})"
    return f"note: {Path(path).name} is not an official release (md5 {md5} matches neither 2022 nor 2023)"


def download(url: str, dest: str | Path, timeout: float = 5.0, progress: bool = True) -> Path:
    """Stream `url` to `dest` (atomically) with a progress bar; fail fast when there is no network."""
    dest = Path(dest)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, atomic.atomic_file(dest, "wb") as fh:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with _progress(progress, DownloadColumn()) as bar:
                task = bar.add_task(f"downloading {dest.name}", total=total)
                while chunk := resp.read(1 << 20):
                    fh.write(chunk)
                    bar.advance(task, len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SubmitError(f"{url}: download failed ({_one_line(reason)}); fetch the zip by hand and pass it as "
                          "SOURCE") from None
    return dest


def summarize(df: pd.DataFrame) -> list[SummaryRow]:
    """Images and identities per split/role, in split then role order (identities exclude pid -1)."""
    rows = []
    for split in SPLITS:
        for role in ROLES:
            part = df[(df["split"] == split) & (df["role"] == role)]
            if part.empty:
                continue
            pids = part.loc[part["pid"] >= 0, "pid"]
            rows.append(SummaryRow(split, role, len(part), int(pids.nunique()) if len(pids) else None))
    return rows


def prepare(source: str | Path, out: str | Path, layout: str = "auto", fetch: bool = False,
            url: str = OFFICIAL_URL, test_fraction: float = 0.2, seed: int = 0, force: bool = False,
            workers: int | None = None, progress: bool = True) -> PrepareResult:
    """Read SOURCE with `layout`, check every image decodes, and write DATA_DIR `out` atomically.

    `fetch` downloads the official zip to SOURCE first when SOURCE does not exist. `test_fraction` and
    `seed` drive the identity split of the folder-per-identity layout. `force` replaces a non-empty `out`.
    """
    source, out = Path(source), Path(out)
    if fetch and not source.exists():
        download(url, source, progress=progress)
    if not source.exists():
        raise SubmitError(f"{source}: no such zip or folder (pass --download to fetch the official zip)")
    _check_out(source, out, force)
    release = release_note(source) if source.is_file() else None
    with _open_source(source) as src:
        plan = layouts.plan(src.names, layout, str(source), layouts.Options(test_fraction, seed))
        if source.is_dir() and plan.layout == "folders" and _inside(out, source):
            raise SubmitError(f"{out}: DATA_DIR must not lie inside the identity folders of {source}")
        made = _make_parents(out)
        try:
            with locks.sibling_lock(out, "prepare"), atomic.atomic_dir(out) as tmp:
                _check_out(source, out, force)  # again, now that no other prepare can fill `out` meanwhile
                _copy_images(src, plan.entries, tmp, workers, progress)
                for name, member in plan.extras.items():
                    (tmp / name).write_bytes(src.read(member))
                df = pd.DataFrame([{c: getattr(e, c) for c in COLUMNS} for e in plan.entries], columns=COLUMNS)
                write_manifest(df, tmp)
        except BaseException:
            for folder in reversed(made):
                _rmdir_quietly(folder)
            raise
    return PrepareResult(out, out / "manifest.csv", plan.layout, release, summarize(df), plan.notes)


# ---- sources --------------------------------------------------------------------------------------


class _ZipSource:
    """Members of a zip, refused whole if any member would land outside the target (`..`, absolute)."""

    def __init__(self, path: Path) -> None:
        self.where = str(path)
        try:
            self.zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise SubmitError(f"{path}: not a readable zip (truncated or corrupt? {_one_line(exc)})") from None
        seen: set[str] = set()
        for name in self.zf.namelist():
            _check_member_name(name, self.where)
            if name in seen:
                raise SubmitError(f"{path}: member {name} appears twice (only one copy could be read); "
                                  "expected each member once")
            seen.add(name)
        self.names = [i.filename for i in self.zf.infolist() if not i.is_dir()]

    def read(self, name: str) -> bytes:
        try:
            return self.zf.read(name)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
            raise SubmitError(f"{self.where}: member {name} cannot be read (truncated or corrupt zip? "
                              f"{_one_line(exc)})") from None

    def close(self) -> None:
        self.zf.close()

    def __enter__(self) -> _ZipSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _DirSource:
    """Files below a folder, as posix paths relative to it."""

    def __init__(self, path: Path) -> None:
        self.root, self.where = path, str(path)
        self.names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())

    def read(self, name: str) -> bytes:
        try:
            return (self.root / name).read_bytes()
        except OSError as exc:
            raise SubmitError(f"{self.root / name}: cannot be read ({_one_line(exc)})") from None

    def __enter__(self) -> _DirSource:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _open_source(path: Path) -> _ZipSource | _DirSource:
    return _DirSource(path) if path.is_dir() else _ZipSource(path)


def _check_member_name(name: str, where: str) -> None:
    """Refuse absolute paths, drive letters and `..` components (zip-slip), whatever the separator."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) or ".." in norm.split("/"):
        raise SubmitError(f"{where}: unsafe member name {name!r} (absolute or '..' path); refusing the zip")


# ---- output ---------------------------------------------------------------------------------------


def _check_out(source: Path, out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SubmitError(f"{out}: exists and is not a folder; expected a new or empty DATA_DIR")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SubmitError(f"{out}: folder is not empty; pass --force to replace it")
    if _inside(source, out):
        raise SubmitError(f"{source}: SOURCE lies inside DATA_DIR {out}; choose another --out")


def _make_parents(out: Path) -> list[Path]:
    """Create the folders above `out`; return those that are new, outermost first, to undo on failure."""
    missing = [p for p in reversed(out.absolute().parents) if not p.exists()]
    made: list[Path] = []
    for folder in missing:
        try:
            folder.mkdir()
        except OSError as exc:
            for done in reversed(made):
                _rmdir_quietly(done)
            raise atomic.write_error(exc, out) from None
        made.append(folder)
    return made


def _rmdir_quietly(folder: Path) -> None:
    """Remove a folder this run created, if it is (still) empty."""
    try:
        folder.rmdir()
    except OSError:
        pass


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _copy_images(src: _ZipSource | _DirSource, entries: list[layouts.Entry], dest: Path, workers: int | None,
                 progress: bool) -> None:
    """Read, decode-check and write every image, a few threads at once (PIL decodes without the GIL)."""
    for folder in {Path(e.path).parent for e in entries}:
        (dest / folder).mkdir(parents=True, exist_ok=True)

    def one(entry: layouts.Entry) -> None:
        data = _check_image(src.read(entry.src), f"{src.where}: {entry.src}")
        (dest / entry.path).write_bytes(data)

    pool = ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1))
    try:
        with _progress(progress, MofNCompleteColumn()) as bar:
            task = bar.add_task("checking images", total=len(entries))
            futures = [pool.submit(one, e) for e in entries]
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
                bar.advance(task, len(done))
                for f in done:
                    f.result()  # re-raises the first SubmitError
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _check_image(data: bytes, where: str) -> bytes:
    """Fully decode the bytes (a corrupt crop fails here, named); return them, 16-bit grey as 8-bit PNG."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.width < 1 or img.height < 1:
                raise ValueError("empty image")
            if img.mode in WIDE_GREY:
                buf = io.BytesIO()
                to_8bit(img).save(buf, format="PNG")
                return buf.getvalue()
            to_8bit(img)  # refuses float and 32-bit pixels
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise SubmitError(f"{where}: not a decodable image ({_decode_reason(exc)}); expected a JPEG/PNG crop") \
            from None
    return data


WIDE_GREY = ("I;16", "I;16B", "I;16L", "I")  # PIL's RGB conversion clips these to white: scale them to 8 bits


def to_8bit(img: Image.Image) -> Image.Image:
    """`img` with 8-bit channels: 16-bit grey scaled by 1/257 (PIL's RGB conversion would clip it to white);
    float or 32-bit pixels raise ValueError. Shared by prepare and every image reader (transforms.open_image)."""
    if img.mode in WIDE_GREY:
        arr = np.asarray(img, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(f"{img.mode} pixel values outside 0..65535")
        return Image.fromarray(np.rint(arr / 257.0).astype(np.uint8), mode="L")
    if img.mode in ("F", "I;32", "I;32B", "I;32L"):
        raise ValueError(f"{img.mode} pixels (floating-point or 32-bit)")
    return img


def _decode_reason(exc: BaseException) -> str:
    """PIL's reason without the repr of the in-memory buffer (`<_io.BytesIO object at 0x...>`)."""
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", _one_line(exc))


def _progress(enabled: bool, counter: ProgressColumn) -> Progress:
    return progress_bar(enabled, counter=counter, bold=False, stderr=True)


def _one_line(obj: object) -> str:
    return " ".join(str(obj).split())
