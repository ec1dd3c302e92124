"""Dataset layouts: turn the file list of a SOURCE (zip members or files under a folder) into manifest rows.

Pure path parsing, no I/O: `prepare.py` reads, checks and copies the files. Each layout maps a source
file to `images/<path below the layout root>` inside DATA_DIR, so the prepared tree mirrors the source:
  official  data_reid/{reid_training, reid_test/{query,gallery}, reid_challenge/{query,gallery}}
            -> images/reid_training/..., images/reid_test/query/..., ...
  market    Market-1501 / DukeMTMC-reID: bounding_box_train, query, bounding_box_test
  folders   ROOT/{identity}/*.jpg, split into train/test by identity with a seeded draw.
`image_id` is the id a ranking file uses: the pid for test images (the official toolkit writes it for
queries and gallery alike, so gallery ids repeat), the file number for challenge images, a running
index for training images. To add a layout: write a `Layout` (detect + read) and add it to LAYOUTS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Callable

import numpy as np

from submit.errors import SubmitError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
IMAGES_DIR = "images"
OFFICIAL_FOLDERS = {  # folder below data_reid -> (split, role)
    "reid_training": ("train", "train"),
    "reid_test/query": ("test", "query"),
    "reid_test/gallery": ("test", "gallery"),
    "reid_challenge/query": ("challenge", "query"),
    "reid_challenge/gallery": ("challenge", "gallery"),
}
MARKET_FOLDERS = {
    "bounding_box_train": ("train", "train"),
    "query": ("test", "query"),
    "bounding_box_test": ("test", "gallery"),
}
OFFICIAL_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)\.(jpe?g|png)$", re.IGNORECASE)
CHALLENGE_NAME = re.compile(r"^(\d+)\.(jpe?g|png)$", re.IGNORECASE)
# Market-1501 `0002_c1s1_000451_03.jpg`, DukeMTMC-reID `0001_c2_f0046182.jpg`; pid -1 = distractor, 0 = junk.
MARKET_NAME = re.compile(r"^(-1|\d+)_c(\d+)(?:s\d+)?_f?(\d+)(?:_\d+)?\.(jpe?g|png)$", re.IGNORECASE)


ID_MIN, ID_MAX = -1, 2**53  # ids are exact in int64 and in the float64 a CSV reader may pass them through


@dataclass(frozen=True)
class Entry:
    """One image to copy: `src` inside the source, `path` relative to DATA_DIR, and its manifest fields."""

    src: str
    path: str
    split: str
    role: str
    pid: int
    seq: int = -1
    frame: int = -1
    image_id: int = -1


@dataclass
class Plan:
    """What a layout found: the images, extra files to copy (DATA_DIR name -> src) and notes for the user."""

    layout: str
    root: str  # prefix of the layout root inside the source ("" or "some/dir/")
    entries: list[Entry]
    extras: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Options:
    """Knobs of the layouts that make their own split (folder-per-identity)."""

    test_fraction: float = 0.2
    seed: int = 0


def is_ignored(path: str) -> bool:
    """Hidden files, macOS resource forks and non-image files are not part of any layout."""
    parts = PurePosixPath(path).parts
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return True
    return not path.lower().endswith(IMAGE_SUFFIXES)


def _roots(paths: list[str], marker: str) -> list[str]:
    """Prefixes P such that some path starts with P + marker + '/', shallowest first."""
    found = set()
    for p in paths:
        parts = p.split("/")
        for i in range(len(parts) - 1):
            if parts[i] == marker:
                found.add("".join(x + "/" for x in parts[:i]))
    return sorted(found, key=lambda r: (r.count("/"), r))


# ---- official -------------------------------------------------------------------------------------


def _official_root(paths: list[str]) -> str | None:
    """The prefix holding `reid_training/` etc. (`.../data_reid/` or the folder itself)."""
    data_reid = _roots(paths, "data_reid")
    if data_reid:
        return data_reid[0] + "data_reid/"
    roots = _roots(paths, "reid_training") + _roots(paths, "reid_test") + _roots(paths, "reid_challenge")
    return sorted(roots, key=lambda r: (r.count("/"), r))[0] if roots else None


def detect_official(paths: list[str]) -> bool:
    """True when the file list holds data_reid/ or its split folders."""
    return _official_root(paths) is not None


def read_official(paths: list[str], where: str, options: Options) -> Plan:
    """The challenge zip layout; every one of the five folders must hold images."""
    root = _official_root(paths)
    if root is None:
        raise SubmitError(f"{where}: no data_reid/ folder; expected data_reid/reid_training/ etc.")
    by_folder: dict[str, list[str]] = {k: [] for k in OFFICIAL_FOLDERS}
    for p in paths:
        if not p.startswith(root) or is_ignored(p):
            continue
        rel = p[len(root):]
        folder, _, name = rel.rpartition("/")
        if folder in by_folder:
            by_folder[folder].append(name)
    entries: list[Entry] = []
    for folder, (split, role) in OFFICIAL_FOLDERS.items():
        names = sorted(by_folder[folder])
        if not names:
            raise SubmitError(f"{where}: missing {root}{folder}/ (expected {split} {role} images there)")
        for name in names:
            src = f"{root}{folder}/{name}"
            dest = f"{IMAGES_DIR}/{folder}/{name}"
            entries.append(_official_entry(src, dest, name, split, role, where))
    _check_unique_ids(entries, where)
    extras = {"numbers.csv": root[: -len("data_reid/")] + "numbers.csv"} if root.endswith("data_reid/") else {}
    extras = {k: v for k, v in extras.items() if v in set(paths)}
    return Plan("official", root, _number_train(entries), extras, _notes(entries))


def _official_entry(src: str, dest: str, name: str, split: str, role: str, where: str) -> Entry:
    if split == "challenge":
        m = CHALLENGE_NAME.match(name)
        if not m:
            raise SubmitError(f"{where}: {src}: expected a challenge name like 00042.jpeg (a number)")
        return Entry(src, dest, split, role, pid=-1, image_id=int(m.group(1)))
    m = OFFICIAL_NAME.match(name)
    if not m:
        raise SubmitError(f"{where}: {src}: expected a name like {{pid}}_{{seq}}_{{frame}}.jpeg")
    pid, seq, frame = (int(m.group(i)) for i in (1, 2, 3))
    return Entry(src, dest, split, role, pid=pid, seq=seq, frame=frame, image_id=pid)


# ---- Market-1501 ----------------------------------------------------------------------------------


def _market_root(paths: list[str]) -> str | None:
    roots = _roots(paths, "bounding_box_test") + _roots(paths, "bounding_box_train")
    return sorted(roots, key=lambda r: (r.count("/"), r))[0] if roots else None


def detect_market(paths: list[str]) -> bool:
    """True when the file list holds bounding_box_train/ or bounding_box_test/."""
    return _market_root(paths) is not None


def read_market(paths: list[str], where: str, options: Options) -> Plan:
    """Market-1501 style: junk (pid 0) dropped; distractors (pid -1) kept in the gallery only; camera -> seq."""
    root = _market_root(paths) or ""
    by_folder: dict[str, list[str]] = {k: [] for k in MARKET_FOLDERS}
    for p in paths:
        if p.startswith(root) and not is_ignored(p):
            folder, _, name = p[len(root):].rpartition("/")
            if folder in by_folder:
                by_folder[folder].append(name)
    entries: list[Entry] = []
    dropped = {"junk": 0, "distractor": 0}
    for folder, (split, role) in MARKET_FOLDERS.items():
        names = sorted(by_folder[folder])
        if not names:
            raise SubmitError(f"{where}: missing {root}{folder}/ (expected Market-1501 {split} {role} images there)")
        for name in names:
            src = f"{root}{folder}/{name}"
            m = MARKET_NAME.match(name)
            if not m:
                raise SubmitError(f"{where}: {src}: expected a Market-1501 name like 0002_c1s1_000451_03.jpg")
            pid, cam, frame = int(m.group(1)), int(m.group(2)), int(m.group(3))
            if pid == 0 or (pid == -1 and role != "gallery"):
                dropped["junk" if pid == 0 else "distractor"] += 1
                continue
            entries.append(Entry(src, f"{IMAGES_DIR}/{folder}/{name}", split, role, pid=pid, seq=cam,
                                 frame=frame, image_id=pid))
    notes = _notes(entries)
    if dropped["junk"]:
        notes.append(f"dropped {dropped['junk']} junk image(s) (pid 0000)")
    if dropped["distractor"]:
        notes.append(f"dropped {dropped['distractor']} distractor image(s) (pid -1) outside the gallery")
    return Plan("market", root, _number_train(entries), {}, notes)


# ---- folder per identity --------------------------------------------------------------------------


def _folders_root(paths: list[str]) -> str:
    """Descend through single wrapping folders until the identity folders appear."""
    files = [p for p in paths if not is_ignored(p)]
    root = ""
    while files and all(p.count("/") >= 2 for p in files):
        tops = {p.split("/", 1)[0] for p in files}
        if len(tops) != 1:
            break
        top = tops.pop()
        root += top + "/"
        files = [p.split("/", 1)[1] for p in files]
    return root


def detect_folders(paths: list[str]) -> bool:
    """True when every image sits one folder deep (ROOT/{identity}/image), in 2+ folders."""
    root = _folders_root(paths)
    files = [p[len(root):] for p in paths if not is_ignored(p)]
    return bool(files) and all(p.count("/") == 1 for p in files) and len({p.split("/")[0] for p in files}) >= 2


def read_folders(paths: list[str], where: str, options: Options) -> Plan:
    """ROOT/{identity}/*.jpg: a seeded share of the identities (with >= 2 images) becomes the test split,
    each test identity giving its first image (name order) as the query and the rest as gallery."""
    if not 0.0 < options.test_fraction < 1.0:
        raise SubmitError(f"test fraction {options.test_fraction}: expected a number between 0 and 1")
    root = _folders_root(paths)
    groups: dict[str, list[str]] = {}
    for p in paths:
        if not p.startswith(root) or is_ignored(p):
            continue
        rel = p[len(root):]
        if rel.count("/") != 1:
            raise SubmitError(f"{where}: {p}: expected ROOT/{{identity}}/{{image}} (one folder per identity)")
        folder, name = rel.split("/")
        groups.setdefault(folder, []).append(name)
    if len(groups) < 2:
        raise SubmitError(f"{where}: found {len(groups)} identity folder(s) under '{root or '.'}'; expected at least 2")
    pids = _folder_pids(sorted(groups), where)
    test = _draw_test(groups, options)
    entries: list[Entry] = []
    for folder in sorted(groups):
        pid = pids[folder]
        for k, name in enumerate(sorted(groups[folder])):
            split, role = ("test", "query" if k == 0 else "gallery") if folder in test else ("train", "train")
            entries.append(Entry(f"{root}{folder}/{name}", f"{IMAGES_DIR}/{folder}/{name}", split, role, pid=pid,
                                 image_id=pid))
    notes = _notes(entries)
    notes.append(f"seeded split (seed {options.seed}): {len(test)} of {len(groups)} identities are test")
    return Plan("folders", root, _number_train(entries), {}, notes)


def _folder_pids(folders: list[str], where: str) -> dict[str, int]:
    """Integer folder names are the pids; otherwise identities are numbered in name order."""
    if all(f.isdigit() for f in folders):
        pids = {f: int(f) for f in folders}
        if len(set(pids.values())) != len(pids):
            raise SubmitError(f"{where}: identity folders {folders} name the same pid twice (e.g. 7 and 007)")
        return pids
    return {f: i for i, f in enumerate(folders)}


def _draw_test(groups: dict[str, list[str]], options: Options) -> set[str]:
    """Seeded draw of test identities among those with a query and at least one gallery image."""
    eligible = sorted(f for f, names in groups.items() if len(names) >= 2)
    n = min(len(eligible), max(1, round(options.test_fraction * len(groups))))
    if n == 0 or n >= len(groups):
        raise SubmitError(f"cannot split {len(groups)} identities into train and test: each side needs one, "
                          "and a test identity needs at least 2 images")
    rng = np.random.default_rng(options.seed)
    return {eligible[i] for i in rng.choice(len(eligible), size=n, replace=False)}


# ---- shared ---------------------------------------------------------------------------------------


def _number_train(entries: list[Entry]) -> list[Entry]:
    """Training images get a running index as image_id (they never appear in a ranking file)."""
    out, k = [], 0
    for e in entries:
        if e.role == "train":
            e = Entry(e.src, e.path, e.split, e.role, e.pid, e.seq, e.frame, image_id=k)
            k += 1
        out.append(e)
    return out


def _check_unique_ids(entries: list[Entry], where: str) -> None:
    """Challenge ids are file numbers: two files with one number (1.jpeg, 001.jpeg) would be ambiguous."""
    seen: dict[tuple[str, int], str] = {}
    for e in entries:
        if e.split == "challenge":
            key = (e.role, e.image_id)
            if key in seen:
                raise SubmitError(f"{where}: {e.src} and {seen[key]} have the same challenge id {e.image_id}")
            seen[key] = e.src


def _notes(entries: list[Entry]) -> list[str]:
    """Warnings worth a line: test queries without a gallery match, identities in both train and test."""
    ids = {(s, r): {e.pid for e in entries if e.split == s and e.role == r} for s, r in
           [("train", "train"), ("test", "query"), ("test", "gallery")]}
    notes = []
    unmatched = ids["test", "query"] - ids["test", "gallery"]
    if unmatched:
        notes.append(f"{len(unmatched)} test query identities have no gallery image (skipped when scoring)")
    shared = ids["train", "train"] & (ids["test", "query"] | ids["test", "gallery"]) - {-1}
    if shared:
        notes.append(f"{len(shared)} identities appear in both train and test")
    return notes


@dataclass(frozen=True)
class Layout:
    """A layout: `detect(paths)` for --layout auto, `read(paths, where, options)` to parse it."""

    detect: Callable[[list[str]], bool]
    read: Callable[[list[str], str, Options], Plan]


LAYOUTS: dict[str, Layout] = {  # detection order for --layout auto
    "official": Layout(detect_official, read_official),
    "market": Layout(detect_market, read_market),
    "folders": Layout(detect_folders, read_folders),
}


def plan(paths: list[str], layout: str, where: str, options: Options | None = None) -> Plan:
    """Parse a source's file list (posix paths relative to the source) with `layout` or, for 'auto', the first
    layout that recognises it. `where` names the source in error messages."""
    options = options or Options()
    if layout == "auto":
        layout = next((name for name, lay in LAYOUTS.items() if lay.detect(paths)), "")
        if not layout:
            raise SubmitError(f"{where}: unrecognised layout; expected data_reid/ (official), Market-1501 "
                              "folders (bounding_box_train/, query/, bounding_box_test/) or ROOT/{identity}/*.jpg")
    if layout not in LAYOUTS:
        raise SubmitError(f"layout {layout!r}: expected one of auto, {', '.join(LAYOUTS)}")
    result = LAYOUTS[layout].read(paths, where, options)
    _check_id_range(result.entries, where)
    return result


def _check_id_range(entries: list[Entry], where: str) -> None:
    """Ids parsed from file names must fit the manifest's int64 columns (a 23-digit pid would wrap around)."""
    for e in entries:
        for name in ("pid", "seq", "frame", "image_id"):
            value = getattr(e, name)
            if not ID_MIN <= value <= ID_MAX:
                raise SubmitError(f"{where}: {e.src}: {name} {value} is out of range; expected "
                                  f"{ID_MIN} <= {name} <= {ID_MAX}")
