"""A deterministic synthetic dataset in the official challenge zip layout, for the demo and the tests.

Each player belongs to a team (jersey and shorts colours) and carries a shirt number drawn on the
jersey; crops vary in scale, aspect, pose offset, background and brightness. The generator also
writes `numbers.csv` (relative path -> shirt number) beside `data_reid/`, the ground truth for the
zero-shot shirt-number reader. Nothing is downloaded.
"""

from __future__ import annotations

import csv
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from submit import atomic

TEAM_COLOURS = [
    ((200, 30, 30), (240, 240, 240)),
    ((30, 60, 200), (30, 30, 30)),
    ((240, 240, 240), (200, 30, 30)),
    ((20, 140, 60), (240, 240, 240)),
    ((250, 200, 20), (30, 60, 200)),
    ((30, 30, 30), (250, 200, 20)),
]
SKIN = [(241, 194, 125), (198, 134, 66), (141, 85, 36), (224, 172, 105)]


@dataclass(frozen=True)
class Player:
    pid: int
    team: int
    number: int
    skin: int
    build: float  # width / height of the body


def _players(n: int, rng: np.random.Generator) -> list[Player]:
    out = []
    for i in range(n):
        team = i % len(TEAM_COLOURS)
        out.append(Player(pid=i + 1, team=team, number=int(rng.integers(0, 100)),
                          skin=int(rng.integers(len(SKIN))), build=float(rng.uniform(0.38, 0.55))))
    return out


def render(player: Player, rng: np.random.Generator) -> Image.Image:
    """One crop of `player` with random scale, aspect, offset, background and light."""
    h = int(rng.integers(80, 120))
    w = max(24, int(h * player.build * rng.uniform(0.9, 1.1)))
    bg = tuple(int(v) for v in rng.integers(90, 170, size=3))
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    jersey, shorts = TEAM_COLOURS[player.team]
    dx = int(rng.integers(-w // 10, w // 10 + 1))
    cx = w // 2 + dx
    head = h // 9
    d.ellipse([cx - head, 2, cx + head, 2 + 2 * head], fill=SKIN[player.skin])
    top, mid, low = 2 + 2 * head, int(h * 0.55), int(h * 0.72)
    bw = int(w * 0.36)
    d.rectangle([cx - bw, top, cx + bw, mid], fill=jersey)
    d.rectangle([cx - bw, mid, cx + bw, low], fill=shorts)
    leg = max(2, bw // 3)
    d.rectangle([cx - bw + 1, low, cx - bw + 1 + leg, h - 2], fill=SKIN[player.skin])
    d.rectangle([cx + bw - 1 - leg, low, cx + bw - 1, h - 2], fill=SKIN[player.skin])
    ink = (0, 0, 0) if sum(jersey) > 380 else (255, 255, 255)
    font = ImageFont.load_default(size=max(10, (mid - top) // 2))
    d.text((cx, (top + mid) // 2), str(player.number), fill=ink, font=font, anchor="mm")
    arr = np.asarray(img, dtype=np.float32) * rng.uniform(0.75, 1.2)
    arr += rng.normal(0, 6, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_dataset(out: str | Path, players: int = 72, seqs: int = 2, frames: int = 5, seed: int = 0,
                 as_zip: bool = False) -> Path:
    """Write the dataset under `out` (a folder holding `data_reid/`, or `out` as a zip); return its path.

    Identities split 60/20/20 into train / test / challenge. Test and challenge queries are the
    first frame of each identity's first sequence; the gallery holds all other crops of those ids.
    """
    if as_zip:
        return _make_zip(Path(out), players, seqs, frames, seed)
    rng = np.random.default_rng(seed)
    roster = _players(players, rng)
    n_train, n_test = int(players * 0.6), int(players * 0.2)
    groups = {"train": roster[:n_train], "test": roster[n_train:n_train + n_test],
              "challenge": roster[n_train + n_test:]}
    folder = Path(out)
    base = folder / "data_reid"
    if base.exists():
        shutil.rmtree(base)
    numbers: list[tuple[str, int]] = []
    challenge_items: dict[str, list[tuple[Image.Image, Player]]] = {"query": [], "gallery": []}
    for split, members in groups.items():
        for p in members:
            for s in range(1, seqs + 1):
                for f in range(frames):
                    img = render(p, rng)
                    role = "query" if (s == 1 and f == 0) else "gallery"
                    name = f"{p.pid}_{s}_{f}.jpeg"
                    if split == "train":
                        rel = f"reid_training/{name}"
                    elif split == "test":
                        rel = f"reid_test/{role}/{name}"
                    else:
                        challenge_items[role].append((img, p))
                        continue
                    _save(img, base / rel)
                    numbers.append((rel, p.number))
    for role, items in challenge_items.items():
        order = rng.permutation(len(items))
        for n, idx in enumerate(order):
            img, p = items[idx]
            rel = f"reid_challenge/{role}/{n:05d}.jpeg"
            _save(img, base / rel)
            numbers.append((rel, p.number))
    with open(folder / "numbers.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "number"), *sorted(numbers)])
    return folder


def _make_zip(root: Path, players: int, seqs: int, frames: int, seed: int) -> Path:
    """The dataset as a zip, built in a scratch folder beside it and written atomically (submit.atomic)."""
    zpath = root if root.suffix == ".zip" else root.with_suffix(".zip")
    atomic.remove_stale(zpath)
    try:
        scratch = atomic.make_temp_dir(zpath)  # created here, exclusively: a link planted at the name is not followed
    except OSError as exc:
        raise atomic.write_error(exc, zpath) from None
    try:
        make_dataset(scratch, players, seqs, frames, seed)
        with atomic.atomic_path(zpath) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            for path in [scratch / "numbers.csv", *sorted((scratch / "data_reid").rglob("*"))]:
                zf.write(path, path.relative_to(scratch).as_posix())
    except OSError as exc:
        raise atomic.write_error(exc, zpath) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return zpath


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=92)
