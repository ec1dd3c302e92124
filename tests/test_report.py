"""The HTML report: structure, outlines against ground truth, thumbnails, plots, errors, and a real browser."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from submit import manifest as mf
from submit.cli import main
from submit.errors import SubmitError
from submit.metrics import evaluate_distances
from submit.report import MARKER, make_report, thumb_name
from submit.prepare import prepare
from submit.synthetic import make_dataset

TOP_K = 5
PER_PAGE = 3


def _write_csv(path: Path, dist: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray) -> Path:
    """A ranking file in the challenge format: `0,<gallery ids>` then `<query id>,<distances>`."""
    lines = ["0," + ",".join(str(int(g)) for g in g_ids)]
    lines += [f"{int(q)}," + ",".join(f"{v:10.5f}" for v in row) for q, row in zip(q_ids, dist)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _noisy_dist(q_pids: np.ndarray, g_pids: np.ndarray, seed: int) -> np.ndarray:
    """Distances that rank the right player high often but not always (so both outlines appear)."""
    rng = np.random.default_rng(seed)
    same = q_pids[:, None] == g_pids[None, :]
    return np.where(same, 0.3, 1.0) + rng.uniform(0, 1.0, size=same.shape)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("synth")
    source = make_dataset(tmp / "src.zip", players=40, seqs=2, frames=4, seed=3, as_zip=True)
    return prepare(source, tmp / "data", workers=1, progress=False).data_dir


@pytest.fixture(scope="module")
def test_ranking(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, pd.DataFrame,
                                                                                   pd.DataFrame]:
    df = mf.read_manifest(data)
    q, g = mf.select(df, "test", "query"), mf.select(df, "test", "gallery")
    dist = _noisy_dist(q.pid.to_numpy(), g.pid.to_numpy(), seed=1)
    path = _write_csv(tmp_path_factory.mktemp("rank") / "test.csv", dist, q.image_id, g.image_id)
    return path, np.round(dist, 5), q, g


@pytest.fixture(scope="module")
def report(test_ranking: tuple, tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    out = tmp_path_factory.mktemp("rep") / "report"
    return make_report(test_ranking[0], data, out, top_k=TOP_K, per_page=PER_PAGE)


def _sections(page: str) -> list[str]:
    return re.findall(r'<section class="q[^"]*".*?</section>', page, flags=re.S)


def test_pages_rows_and_outlines_follow_ground_truth(report: Path, test_ranking: tuple) -> None:
    _, dist, q, g = test_ranking
    out = report.parent
    n_pages = -(-len(q) // PER_PAGE)
    pages = ["index.html"] + [f"page-{p}.html" for p in range(2, n_pages + 1)]
    assert sorted(p.name for p in out.glob("*.html")) == sorted(pages)
    order = np.argsort(dist, axis=1, kind="stable")[:, :TOP_K]
    seen = 0
    for p, name in enumerate(pages, start=1):
        html = (out / name).read_text()
        rows = _sections(html)
        assert len(rows) == min(PER_PAGE, len(q) - (p - 1) * PER_PAGE)
        for row in rows:
            i = seen
            seen += 1
            hits = re.findall(r'<figure class="hit( match| miss)">', row)
            truth = [" match" if g.pid[j] == q.pid[i] else " miss" for j in order[i]]
            assert hits == truth, f"query row {i}"
        if n_pages > 1:
            assert 'rel="next"' in html or p == n_pages
    assert seen == len(q)


def test_thumbnails_and_plots_exist(report: Path) -> None:
    out = report.parent
    srcs = set(re.findall(r'src="(thumbs/[^"]+)"', "".join(p.read_text() for p in out.glob("*.html"))))
    assert srcs
    for src in srcs:
        with Image.open(out / src) as im:
            assert im.format == "JPEG" and im.height <= 128
    for png in ("cmc.png", "ap.png", "distances.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.width > 100
    assert (out / MARKER).is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".report.")], "temp folder left behind"


def test_header_shows_scores(report: Path, test_ranking: tuple) -> None:
    _, dist, q, g = test_ranking
    want = evaluate_distances(dist, q.pid.to_numpy(), g.pid.to_numpy())
    html = report.read_text()
    assert f"<b>{100 * want['mAP']:.2f}</b>mAP" in html
    assert f"<b>{100 * want['rank1']:.2f}</b>rank-1" in html


def test_rerun_reuses_fresh_thumbnails_and_redoes_stale_ones(data: Path, test_ranking: tuple,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "rep"
    make_report(test_ranking[0], data, out, top_k=2, per_page=50)
    q_rel = test_ranking[2].path[0]
    thumbs = {p.name: p.stat().st_ino for p in (out / "thumbs").iterdir()}
    src = data / q_rel
    later = time.time() + 5
    os.utime(src, (later, later))
    try:
        make_report(test_ranking[0], data, out, top_k=2, per_page=50)
    finally:
        os.utime(src, None)
    again = {p.name: p.stat().st_ino for p in (out / "thumbs").iterdir()}
    assert again.keys() == thumbs.keys()
    changed = {n for n in thumbs if thumbs[n] != again[n]}
    assert changed == {thumb_name(q_rel)}


def test_challenge_split_has_no_outlines(data: Path, tmp_path: Path) -> None:
    df = mf.read_manifest(data)
    q, g = mf.select(df, "challenge", "query"), mf.select(df, "challenge", "gallery")
    dist = np.random.default_rng(0).uniform(size=(len(q), len(g)))
    path = _write_csv(tmp_path / "ch.csv", dist, q.image_id, g.image_id)
    index = make_report(path, data, tmp_path / "rep", top_k=3, per_page=100)
    html = index.read_text()
    assert len(_sections(html)) == len(q)
    assert "challenge split" in html and " match" not in html and " miss" not in html
    assert (tmp_path / "rep" / "distances.png").is_file() and not (tmp_path / "rep" / "cmc.png").exists()


def test_query_without_gallery_match_is_flagged(data: Path, tmp_path: Path) -> None:
    df = mf.read_manifest(data)
    q = mf.select(df, "test", "query")
    lonely = int(q.pid[0])
    alt = tmp_path / "alt"
    alt.mkdir()
    (alt / "images").symlink_to(data / "images")
    mf.write_manifest(df[~((df.split == "test") & (df.role == "gallery") & (df.pid == lonely))], alt)
    g = mf.select(mf.read_manifest(alt), "test", "gallery")
    path = _write_csv(tmp_path / "t.csv", _noisy_dist(q.pid.to_numpy(), g.pid.to_numpy(), 2), q.image_id, g.image_id)
    html = make_report(path, alt, tmp_path / "rep", top_k=3).read_text()
    first = _sections(html)[0]
    assert "no match in gallery" in first and " match" not in first.replace("no match", "")
    assert "1 query has no match in the gallery" in html


def test_cli_report_smoke(test_ranking: tuple, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-rep"
    res = CliRunner().invoke(main, ["report", str(test_ranking[0]), "--data", str(data), "--out", str(out),
                                    "--top-k", "3", "--split", "test"])
    assert res.exit_code == 0, res.output
    assert str(out / "index.html") in res.output
    assert len(re.findall(r'<figure class="hit', _sections((out / "index.html").read_text())[0])) == 3


def test_ids_not_in_manifest_is_one_line_error(test_ranking: tuple, data: Path, tmp_path: Path) -> None:
    _, dist, q, g = test_ranking
    q_ids = q.image_id.to_numpy().copy()
    q_ids[-1] = 999
    bad = _write_csv(tmp_path / "bad.csv", dist, q_ids, g.image_id)
    out = tmp_path / "rep"
    res = CliRunner().invoke(main, ["report", str(bad), "--data", str(data), "--out", str(out)])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.csv" in lines[0]
    for split in ("auto", "test"):
        with pytest.raises(SubmitError, match=r"bad\.csv: query ids differ .* \(e\.g\. 999\) \(test/query\)"):
            make_report(bad, data, out, split=split)
    assert not out.exists()
    short = _write_csv(tmp_path / "short.csv", dist[:, 1:], q.image_id, g.image_id[1:])
    with pytest.raises(SubmitError, match=r"short\.csv: its \d+ query x \d+ gallery ids match no split of .*manifest"):
        make_report(short, data, out)


def test_refuses_to_replace_a_foreign_folder_and_keeps_old_report(test_ranking: tuple, data: Path,
                                                                  tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SubmitError, match="mine: exists and is not a report folder"):
        make_report(test_ranking[0], data, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    out = tmp_path / "rep"
    make_report(test_ranking[0], data, out, top_k=2)
    before = (out / "index.html").read_text()
    with pytest.raises(SubmitError, match="--top-k 0"):
        make_report(test_ranking[0], data, out, top_k=0)
    assert (out / "index.html").read_text() == before


# ---------------------------------------------------------------- in a real browser


def _chromium() -> str:
    for cand in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if cand and os.access(cand, os.X_OK):
            return cand
    pytest.skip("no Chromium browser found (/usr/bin/chromium or chromium on PATH); "
                "install it with `apt-get install -y chromium` to run the browser check")


def _run_browser(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={profile}", "--window-size=1280,1400"]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=90)


def test_page_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    browser = _chromium()
    url = report.resolve().as_uri()
    dom = _run_browser(browser, tmp_path / "profile-dom", "--virtual-time-budget=8000", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, dom.stdout[:500]
    attrs = dict(re.findall(r'(data-[a-z]+)="(\d+)"', body.group(1)))
    n_imgs = 3 + PER_PAGE * (1 + TOP_K)  # three plots + per row the query and its top-k
    assert attrs.get("data-images") == str(n_imgs), attrs
    assert attrs.get("data-loaded") == str(n_imgs) and attrs.get("data-broken") == "0", attrs
    assert len(_sections(dom.stdout)) == PER_PAGE

    shot = tmp_path / "shot.png"
    res = _run_browser(browser, tmp_path / "profile-shot", "--virtual-time-budget=8000",
                       f"--screenshot={shot}", url)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert pixels.std() > 20, "screenshot looks blank"
    # The outlines are flat CSS colours; noisy JPEG jerseys almost never hit them exactly.
    green = (abs(pixels - (31, 157, 58)).sum(axis=2) <= 6).sum()
    red = (abs(pixels - (208, 49, 45)).sum(axis=2) <= 6).sum()
    assert green > 500 and red > 500, (green, red)
    keep = os.environ.get("REPORT_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
