"""A static HTML report of a ranking file: per query its crop and top-k gallery crops, scores and plots.

Open `index.html` straight from disk (no server). Queries are paged (`per_page` per HTML file);
images are small JPEG thumbnails in `thumbs/`, lazily loaded, reused from the previous report when
still newer than their source. On the test split correct matches are outlined green, wrong ones red,
and a CMC curve and a per-query AP histogram are drawn. The folder is built beside `out_dir` and
swapped in at the end, so a failed run never leaves a half-written report.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from submit import atomic, ranking_file
from submit import manifest as mf
from submit.errors import SubmitError
from submit.metrics import METRIC_LABELS, average_precision, evaluate_distances
from submit.prepare import to_8bit
from submit.progress import progress_bar
from submit.ranking_file import detect_split, id_mismatch, read_ranking

THUMB_HEIGHT = 128
MARKER = ".reident-report"  # marks a folder as ours, so a rerun may replace it
CMC_RANKS = 50


@dataclass(frozen=True)
class Aligned:
    """A ranking file matched to manifest rows: dist[i, j] is query row i vs gallery row j."""

    dist: np.ndarray
    queries: pd.DataFrame
    gallery: pd.DataFrame
    split: str

    @property
    def has_truth(self) -> bool:
        """Whether identities are known for both sides (test split), so matches can be judged."""
        return bool((self.queries["pid"] >= 0).all() and (self.gallery["pid"] >= 0).all())


# ---------------------------------------------------------------- loading and alignment


def load_aligned(ranking_csv: str | Path, data_dir: str | Path, split: str = "auto") -> Aligned:
    """Read the ranking file and map its rows/columns to manifest rows (stable sort by image_id).

    The manifest is read first: the ranking file is bounded by what one for its split (or, with `auto`, for
    the manifest's largest ranked split) can be, so a huge file is refused before it is read."""
    if split not in ("auto", "test", "challenge"):
        raise SubmitError(f"--split {split!r}: expected auto, test or challenge")
    df = mf.read_manifest(data_dir)
    limit = ranking_file.manifest_size_limit(df, None if split == "auto" else split)
    if limit is None:
        which = "test or challenge" if split == "auto" else split
        raise SubmitError(f"{ranking_csv}: the manifest in {data_dir} has no {which} query and gallery images "
                          "to compare with")
    # validated: ids ascending, as manifest.select orders rows
    dist, q_ids, g_ids = read_ranking(ranking_csv, limit=limit)
    if split == "auto":
        split = _detect_split(df, q_ids, g_ids, ranking_csv, data_dir)
    queries = _rows(df, split, "query", q_ids, ranking_csv)
    gallery = _rows(df, split, "gallery", g_ids, ranking_csv)
    return Aligned(dist=dist, queries=queries, gallery=gallery, split=split)


def _detect_split(df: pd.DataFrame, q_ids: np.ndarray, g_ids: np.ndarray,
                  ranking_csv: str | Path, data_dir: str | Path) -> str:
    """The file's split by `ranking_file.detect_split` (an inexact match is returned: `_rows` names the ids)."""
    match = detect_split(df, q_ids, g_ids)
    if match.ambiguous:
        raise SubmitError(f"{ranking_csv}: ids fit both test and challenge splits; pass --split")
    if match.split:
        return match.split
    sizes = ", ".join(f"{s} {_count(df, s, 'query')}x{_count(df, s, 'gallery')}" for s in ("test", "challenge"))
    raise SubmitError(f"{ranking_csv}: its {len(q_ids)} query x {len(g_ids)} gallery ids match no split of "
                      f"{mf.manifest_path(data_dir)} ({sizes}); wrong --data?")


def _count(df: pd.DataFrame, split: str, role: str) -> int:
    return int(((df["split"] == split) & (df["role"] == role)).sum())


def _rows(df: pd.DataFrame, split: str, role: str, ids: np.ndarray, ranking_csv: str | Path) -> pd.DataFrame:
    """The manifest rows for the file's `role` ids (both ascending, so row k is column/line k)."""
    rows = mf.select(df, split, role)
    problem = id_mismatch(role, ids, rows["image_id"])
    if problem:
        raise SubmitError(f"{ranking_csv}: {problem} ({split}/{role})")
    return rows


# ---------------------------------------------------------------- scores


@dataclass(frozen=True)
class Scores:
    """Everything judged against ground truth; empty when identities are unknown (challenge)."""

    summary: dict[str, float]
    ap: np.ndarray  # per query, NaN where the gallery holds no match
    first_hit: np.ndarray  # 1-based rank of the first correct match, 0 where none
    n_matches: np.ndarray
    cmc: np.ndarray  # cmc[k-1] = share of (matchable) queries with a match in the top k


def score(al: Aligned, order: np.ndarray) -> Scores | None:
    """Per-query AP, first-hit rank and the CMC curve; None without ground truth."""
    if not al.has_truth:
        return None
    q_pids = al.queries["pid"].to_numpy()
    g_pids = al.gallery["pid"].to_numpy()
    matches = q_pids[:, None] == g_pids[None, :]
    has = matches.any(axis=1)
    ap = np.asarray(average_precision(al.dist, matches), dtype=np.float64)
    ap = np.where(has, ap, np.nan)
    sorted_matches = np.take_along_axis(matches, order, axis=1)
    first = np.where(has, sorted_matches.argmax(axis=1) + 1, 0)
    ranks = np.arange(1, min(CMC_RANKS, matches.shape[1]) + 1)
    valid = first[has]
    cmc = (valid[:, None] <= ranks[None, :]).mean(axis=0) if valid.size else np.zeros(len(ranks))
    summary = {k: float(v) for k, v in evaluate_distances(al.dist, q_pids, g_pids).items()}
    return Scores(summary=summary, ap=ap, first_hit=first, n_matches=matches.sum(axis=1), cmc=cmc)


# ---------------------------------------------------------------- plots


def write_plots(out: Path, al: Aligned, order: np.ndarray, scores: Scores | None) -> list[str]:
    """Write the PNG plots (CMC, AP histogram with truth; top-1 distance histogram always)."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

    names = []
    if scores is not None:
        fig = Figure(figsize=(5, 3.4), dpi=100)
        ax = fig.add_subplot()
        ranks = np.arange(1, len(scores.cmc) + 1)
        ax.plot(ranks, 100 * scores.cmc, marker=".", color="#1f5fa8")
        ax.set(xlabel="rank", ylabel="matching queries (%)", title="CMC", ylim=(0, 101), xlim=(1, ranks[-1]))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "cmc.png")
        names.append("cmc.png")
        fig = Figure(figsize=(5, 3.4), dpi=100)
        ax = fig.add_subplot()
        ap = scores.ap[~np.isnan(scores.ap)]
        ax.hist(ap, bins=np.linspace(0, 1, 21).tolist(), color="#3a8f4b", edgecolor="white")
        ax.set(xlabel="average precision", ylabel="queries", title=f"Per-query AP (mean {ap.mean():.3f})"
               if ap.size else "Per-query AP")
        fig.tight_layout()
        fig.savefig(out / "ap.png")
        names.append("ap.png")
    fig = Figure(figsize=(5, 3.4), dpi=100)
    ax = fig.add_subplot()
    top1 = al.dist[np.arange(len(order)), order[:, 0]]
    bins = np.histogram_bin_edges(top1, bins=20).tolist()
    if scores is not None:
        ok = scores.first_hit == 1
        ax.hist([top1[ok], top1[~ok]], bins=bins, stacked=True, color=["#6aa84f", "#e69138"],
                label=["rank-1 correct", "rank-1 wrong"])
        ax.legend()
    else:
        ax.hist(top1, bins=bins, color="#1f5fa8")
    ax.set(xlabel="distance to the top-1 gallery crop", ylabel="queries", title="Top-1 distances")
    fig.tight_layout()
    fig.savefig(out / "distances.png")
    names.append("distances.png")
    return names


# ---------------------------------------------------------------- thumbnails


def thumb_name(rel: str) -> str:
    """A flat, safe, collision-free file name for the thumbnail of manifest path `rel`."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(rel).with_suffix("").as_posix().replace("/", "__"))
    digest = hashlib.sha1(f"{rel}|{THUMB_HEIGHT}".encode()).hexdigest()[:8]
    return f"{stem[-60:]}-{digest}.jpg"


def write_thumbs(rels: list[str], data_dir: Path, thumbs: Path, previous: Path | None) -> dict[str, tuple[int, int]]:
    """Write one small JPEG per crop into `thumbs`; reuse `previous`'s when newer than the source.

    Returns path -> (width, height) of its thumbnail (for layout-stable <img> tags).
    """
    thumbs.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, tuple[int, int]] = {}
    with progress_bar(bold=False) as bar:
        task = bar.add_task("thumbnails", total=len(rels))
        for rel in rels:
            sizes[rel] = _thumb(rel, data_dir, thumbs, previous)
            bar.advance(task)
    return sizes


def _thumb(rel: str, data_dir: Path, thumbs: Path, previous: Path | None) -> tuple[int, int]:
    src = data_dir / rel
    name = thumb_name(rel)
    try:
        src_mtime = src.stat().st_mtime
    except FileNotFoundError:
        raise SubmitError(f"{src}: image listed in {mf.manifest_path(data_dir)} is missing") from None
    old = previous / name if previous is not None else None
    if old is not None and old.is_file() and old.stat().st_mtime >= src_mtime:
        try:
            os.link(old, thumbs / name)
        except OSError:
            shutil.copy2(old, thumbs / name)
        with Image.open(thumbs / name) as im:
            return im.size
    try:
        with Image.open(src) as im:
            im = to_8bit(im).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise SubmitError(f"{src}: not a readable image ({type(exc).__name__})") from None
    scale = min(1.0, THUMB_HEIGHT / im.height, THUMB_HEIGHT / im.width * 2)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BILINEAR)
    im.save(thumbs / name, "JPEG", quality=85)  # an OSError here is the output's (full disk), not the image's
    return im.size


# ---------------------------------------------------------------- HTML


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:0;background:#f6f6f4;color:#222}
header{background:#1d2b3a;color:#fff;padding:10px 18px}
header h1{font-size:18px;margin:0 0 4px}
header .meta{font-size:13px;opacity:.8}
.scores{display:flex;gap:18px;margin-top:8px;flex-wrap:wrap}
.score b{display:block;font-size:22px}.score{font-size:12px}
main{padding:8px 18px}
nav.pages{margin:10px 0;font-size:14px}nav.pages a,nav.pages span{margin-right:6px}
nav.pages .cur{font-weight:bold}
.plots img{height:240px;margin-right:8px;background:#fff;border:1px solid #ddd}
.controls{font-size:13px;margin:6px 0}
.q{display:flex;gap:10px;align-items:flex-start;padding:8px 0;border-bottom:1px solid #ddd}
.q figure{margin:0;font-size:11px;text-align:center;line-height:1.25}
.q img{display:block;margin:0 auto 2px;height:112px;width:auto;border:3px solid #ccc;background:#eee}
.q .query img{border-color:#1d2b3a}
.q .query figcaption{max-width:120px}
.hits{display:flex;gap:6px;flex-wrap:wrap}
.hit.match img{border-color:#1f9d3a}
.hit.miss img{border-color:#d0312d}
.bad{color:#b02020}
body.errors-only .q.perfect{display:none}
table.worst{border-collapse:collapse;font-size:13px}table.worst td{padding:1px 8px}
"""

JS = """
function countImages(){var ok=0,bad=0,imgs=document.images;
 for(var i=0;i<imgs.length;i++){var m=imgs[i];if(m.complete){if(m.naturalWidth>0)ok++;else bad++;}}
 document.body.setAttribute('data-images',imgs.length);document.body.setAttribute('data-loaded',ok);
 document.body.setAttribute('data-broken',bad);}
window.addEventListener('load',function(){countImages();
 for(var i=0;i<document.images.length;i++){document.images[i].addEventListener('load',countImages);
  document.images[i].addEventListener('error',countImages);}});
document.addEventListener('keydown',function(e){var a=document.querySelector(
 e.key==='ArrowRight'?'a[rel=next]':e.key==='ArrowLeft'?'a[rel=prev]':null);if(a)location.href=a.href;});
function toggleErrors(box){document.body.classList.toggle('errors-only',box.checked);}
"""


def page_file(page: int) -> str:
    """The HTML file name of 1-based page `page` (page 1 is index.html)."""
    return "index.html" if page == 1 else f"page-{page}.html"


@dataclass(frozen=True)
class PageContext:
    """What every page needs besides its own query rows."""

    title: str
    meta: str
    scores: Scores | None
    n_pages: int
    per_page: int
    query_ids: tuple[int, ...]  # for naming the hardest queries


def _nav(page: int, n_pages: int) -> str:
    if n_pages == 1:
        return ""
    parts = []
    if page > 1:
        parts.append(f'<a rel="prev" href="{page_file(page - 1)}">&lsaquo; prev</a>')
    for p in range(1, n_pages + 1):
        parts.append(f'<span class="cur">{p}</span>' if p == page else f'<a href="{page_file(p)}">{p}</a>')
    if page < n_pages:
        parts.append(f'<a rel="next" href="{page_file(page + 1)}">next &rsaquo;</a>')
    return '<nav class="pages">' + " ".join(parts) + "</nav>"


def _header(ctx: PageContext) -> str:
    cells = ""
    if ctx.scores is not None:
        cells = "".join(f'<div class="score"><b>{100 * ctx.scores.summary[k]:.2f}</b>{label}</div>'
                        for k, label in METRIC_LABELS.items() if k in ctx.scores.summary)
        cells = f'<div class="scores">{cells}</div>'
    return (f"<header><h1>{html.escape(ctx.title)}</h1><div class=\"meta\">{html.escape(ctx.meta)}</div>"
            f"{cells}</header>")


def _img(rel: str, sizes: dict[str, tuple[int, int]], title: str) -> str:
    w, h = sizes[rel]
    return (f'<img loading="lazy" src="thumbs/{html.escape(thumb_name(rel))}" width="{w}" height="{h}" '
            f'alt="{html.escape(rel)}" title="{html.escape(title)}">')


def _row(i: int, al: Aligned, order: np.ndarray, top_k: int, scores: Scores | None,
         sizes: dict[str, tuple[int, int]]) -> str:
    q = al.queries.iloc[i]
    caption = f"query {int(q.image_id)}"
    cls = "q"
    if scores is not None:
        if np.isnan(scores.ap[i]):
            caption += '<br><span class="bad">no match in gallery</span>'
        else:
            caption += f"<br>AP {scores.ap[i]:.3f}<br>first match @{scores.first_hit[i]}"
            caption += f"<br>{scores.n_matches[i]} in gallery"
            cls += " perfect" if scores.ap[i] >= 1.0 - 1e-9 else ""
    hits = []
    for r, j in enumerate(order[i, :top_k], start=1):
        g = al.gallery.iloc[j]
        kind = ""
        if scores is not None:
            kind = " match" if g.pid == q.pid else " miss"
        title = f"{g.path}  pid {g.pid}  seq {g.seq}  frame {g.frame}"
        hits.append(f'<figure class="hit{kind}">{_img(g.path, sizes, title)}'
                    f"<figcaption>{r} &middot; {al.dist[i, j]:.3f}</figcaption></figure>")
    query = f'<figure class="query">{_img(q.path, sizes, q.path)}<figcaption>{caption}</figcaption></figure>'
    return f'<section class="{cls}" id="q{i}">{query}<div class="hits">{"".join(hits)}</div></section>'


def _summary_block(ctx: PageContext, plots: list[str]) -> str:
    imgs = "".join(f'<img src="{p}" alt="{p}">' for p in plots)
    worst = ""
    if ctx.scores is not None and (~np.isnan(ctx.scores.ap)).any():
        ap = np.where(np.isnan(ctx.scores.ap), np.inf, ctx.scores.ap)
        idx = [int(i) for i in np.argsort(ap, kind="stable")[:10] if ap[i] < 1.0]
        rows = "".join(f'<tr><td><a href="{page_file(i // ctx.per_page + 1)}#q{i}">query {ctx.query_ids[i]}</a></td>'
                       f"<td>AP {ap[i]:.3f}</td><td>first match @{ctx.scores.first_hit[i]}</td></tr>" for i in idx)
        if rows:
            worst = f'<h3>Hardest queries</h3><table class="worst">{rows}</table>'
    return f'<div class="plots">{imgs}</div>{worst}'


def render_page(page: int, body_rows: list[str], ctx: PageContext, plots: list[str]) -> str:
    """One complete HTML page: header with scores, page links, (on page 1) plots, then query rows."""
    nav = _nav(page, ctx.n_pages)
    extra = _summary_block(ctx, plots) if page == 1 else '<p><a href="index.html">summary &amp; plots</a></p>'
    toggle = ('<div class="controls"><label><input type="checkbox" onchange="toggleErrors(this)"> '
              "hide queries with AP 1</label></div>") if ctx.scores is not None else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(ctx.title)} &ndash; page {page}</title><style>{CSS}</style>"
            f"<script>{JS}</script></head>\n<body data-page=\"{page}\" data-rows=\"{len(body_rows)}\">"
            f"{_header(ctx)}<main>{extra}{nav}{toggle}\n" + "\n".join(body_rows) + f"\n{nav}</main></body></html>\n")


# ---------------------------------------------------------------- the report


def make_report(ranking_csv: str | Path, data_dir: str | Path, out_dir: str | Path, top_k: int = 10,
                per_page: int = 50, split: str = "auto") -> Path:
    """Build the static HTML report of `ranking_csv` into `out_dir` (atomically); return its index.html."""
    if top_k < 1:
        raise SubmitError(f"--top-k {top_k}: expected a positive integer")
    if per_page < 1:
        raise SubmitError(f"per_page {per_page}: expected a positive integer")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    _check_out_dir(out_dir)
    al = load_aligned(ranking_csv, data_dir, split)
    top_k = min(top_k, al.dist.shape[1])
    order = np.argsort(al.dist, axis=1, kind="stable")
    scores = score(al, order)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise atomic.write_error(exc, out_dir) from None
    with atomic.atomic_dir(out_dir) as tmp:
        _build(tmp, al, order, scores, data_dir, out_dir, top_k, per_page, Path(ranking_csv).name)
    return out_dir / "index.html"


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace anything that is not an earlier report."""
    if out_dir.exists() and not (out_dir.is_dir() and ((out_dir / MARKER).is_file() or not any(out_dir.iterdir()))):
        raise SubmitError(f"{out_dir}: exists and is not a report folder; choose another --out")


def _build(tmp: Path, al: Aligned, order: np.ndarray, scores: Scores | None, data_dir: Path, out_dir: Path,
           top_k: int, per_page: int, name: str) -> None:
    needed = list(dict.fromkeys([*al.queries["path"], *al.gallery["path"].to_numpy()[np.unique(order[:, :top_k])]]))
    previous = out_dir / "thumbs" if (out_dir / "thumbs").is_dir() else None
    sizes = write_thumbs(needed, data_dir, tmp / "thumbs", previous)
    plots = write_plots(tmp, al, order, scores)
    n_q = al.dist.shape[0]
    n_pages = max(1, -(-n_q // per_page))
    ctx = PageContext(title=f"Ranking report: {name}", per_page=per_page, scores=scores, n_pages=n_pages,
                      meta=_meta(al, scores, top_k), query_ids=tuple(int(x) for x in al.queries["image_id"]))
    for page in range(1, n_pages + 1):
        rows = [_row(i, al, order, top_k, scores, sizes)
                for i in range((page - 1) * per_page, min(page * per_page, n_q))]
        (tmp / page_file(page)).write_text(render_page(page, rows, ctx, plots), encoding="utf-8")
    (tmp / MARKER).write_text("reident-submit report\n")


def _meta(al: Aligned, scores: Scores | None, top_k: int) -> str:
    """The line under the title: split, sizes, and what the scores leave out."""
    n_q, n_g = al.dist.shape
    text = f"{al.split} split - {n_q} queries x {n_g} gallery crops - top {top_k} shown"
    if scores is None:
        return text + " - no ground truth (identities unknown)"
    lonely = int(np.isnan(scores.ap).sum())
    if not lonely:
        return text
    return text + f" - {lonely} quer{'y has' if lonely == 1 else 'ies have'} no match in the gallery (not scored)"
