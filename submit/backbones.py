"""Model factory: open_clip and timm image towers behind one `Embedder` interface.

`build_embedder(spec)` turns a recipe's `BackboneSpec` into an `nn.Module` that maps a normalised
(B, 3, H, W) batch to (B, D) features and carries what the rest of the pipeline needs (input size,
normalisation, CLIP's logit scale, spatial feature maps for Score-CAM). `load_clip` returns the full
open_clip model with its text tower (zero-shot shirt-number reading).

Weights (`spec.pretrained`) are resolved BEFORE any model is built, so a missing download fails at
once with a one-line `SubmitError`: an open_clip tag (`openai`, `laion2b_s32b_b82k`, ...), the timm
default weights (`timm`), `hf-hub:<org>/<repo>`, or a local checkpoint file. Hub files come from the
local Hugging Face cache; the hub is only contacted when it is reachable and HF_HUB_OFFLINE is unset.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

import torch
from torch import nn

from submit.errors import SubmitError
from submit.recipe import BackboneSpec

OPEN_CLIP = "open_clip:"
TIMM = "timm:"
HF_HUB = "hf-hub:"
TIMM_DEFAULT_TAGS = ("timm", "default", "true")
CLIP_INIT_LOGIT_SCALE = 1 / 0.07
LOCAL_FILE_HINT = "or set `pretrained: /path/to/checkpoint.bin` in the recipe to use a local file"

TINY_VIT = "reident-tiny-vit"
TINY_VIT_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def register_tiny_models() -> None:
    """Register the tiny open_clip config used by tests and the demo (idempotent)."""
    from open_clip import factory

    # open_clip keeps its registry in `_MODEL_CONFIGS`; rescans rebuild it from the existing entries,
    # so an entry added here survives later `add_model_config` calls.
    factory._MODEL_CONFIGS.setdefault(TINY_VIT, TINY_VIT_CONFIG)


class Embedder(nn.Module):
    """An image tower with the metadata the pipeline needs; `forward` gives (B, D) raw features."""

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        input_size: tuple[int, int],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        embed_dim: int,
        logit_scale_init: float,
    ) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.embed_dim = int(embed_dim)
        self.logit_scale_init = float(logit_scale_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, D) features (not L2-normalised)."""
        return self.model(x)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) maps of the last stage: CNN features or ViT patch tokens on their grid."""
        if not hasattr(self.model, "forward_intermediates"):
            raise SubmitError(f"backbone {self.name}: no feature maps (the model lacks forward_intermediates)")
        out = self.model.forward_intermediates(x, indices=1, intermediates_only=True)
        return (out["image_intermediates"] if isinstance(out, dict) else out)[-1]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory during training (both libraries implement it per block)."""
        self.model.set_grad_checkpointing(enable)


# ---------------------------------------------------------------- factory


def build_embedder(spec: BackboneSpec, load_weights: bool = True) -> Embedder:
    """Build the image tower named by `spec`; `load_weights=False` skips `spec.pretrained` (the caller
    loads a fine-tuned state dict instead, e.g. a training run's checkpoint)."""
    pretrained = spec.pretrained if load_weights else None
    if spec.name.startswith(OPEN_CLIP):
        return _open_clip_embedder(spec, spec.name[len(OPEN_CLIP):], pretrained)
    if spec.name.startswith(TIMM):
        return _timm_embedder(spec, spec.name[len(TIMM):], pretrained)
    raise SubmitError(f"backbone.name {spec.name!r}: expected 'open_clip:<model>' or 'timm:<model>'")


def load_clip(name: str, pretrained: str | None) -> tuple[nn.Module, Callable[..., torch.Tensor]]:
    """The FULL open_clip model (image + text towers, eval mode) and its tokenizer; the image tower's
    `preprocess_cfg` carries the weights' own mean/std."""
    import open_clip

    arch, preprocess = _open_clip_arch(name.removeprefix(OPEN_CLIP))
    model = _build_open_clip(arch, pretrained, image_size=None, preprocess=preprocess)
    try:
        tokenizer = open_clip.get_tokenizer(arch)
    except Exception as exc:  # noqa: BLE001 - tokenizers may need a download; report it on one line
        raise SubmitError(f"open_clip model {arch!r}: cannot load its tokenizer ({_first_line(exc)})") from None
    return model.eval(), tokenizer


# ---------------------------------------------------------------- open_clip


def _open_clip_arch(name: str) -> tuple[str, dict]:
    """(registered architecture name, preprocessing overrides) for an open_clip model name.

    Built-in names are checked (`ViT-L/14` is accepted as `ViT-L-14`); `hf-hub:<org>/<repo>` reads the
    repo's `open_clip_config.json` from the HF cache and registers it locally, so nothing refetches it."""
    import open_clip
    from open_clip import factory

    register_tiny_models()
    if name.startswith(HF_HUB):
        repo = name[len(HF_HUB):]
        path = _hub_file(repo, ("open_clip_config.json",), what=f"open_clip config of {name}")
        try:
            config = json.loads(path.read_text())
        except ValueError:
            config = None
        model_cfg = config.get("model_cfg", config) if isinstance(config, dict) else None
        if not isinstance(model_cfg, dict) or not {"vision_cfg", "text_cfg"} <= set(model_cfg):
            raise SubmitError(f"{path}: not an open_clip model config (needs model_cfg.vision_cfg and text_cfg)")
        arch = "hub--" + repo.replace("/", "--")
        factory._MODEL_CONFIGS[arch] = model_cfg
        return arch, dict(config.get("preprocess_cfg", {}))
    arch = name.replace("/", "-")
    if arch not in open_clip.list_models():
        raise SubmitError(f"backbone.name 'open_clip:{name}': unknown open_clip model (see open_clip.list_models())")
    return arch, {}


def _open_clip_embedder(spec: BackboneSpec, name: str, pretrained: str | None) -> Embedder:
    arch, preprocess = _open_clip_arch(name)
    token = spec.embedding == "token"
    clip = _build_open_clip(arch, pretrained, image_size=spec.image_size, preprocess=preprocess, token=token)
    logit_scale = float(clip.logit_scale.detach().exp().item())
    visual = clip.visual
    del clip  # the text tower is not part of the embedder
    if getattr(visual, "output_tokens", False):
        visual.output_tokens = False  # CoCa towers also return their tokens; the embedder wants one vector
    if token:
        embed_dim = _drop_projection(visual, arch)
    else:
        embed_dim = int(getattr(visual, "output_dim", 0)) or _probe_dim(visual, visual.image_size)
    return Embedder(
        visual,
        name=spec.name,
        input_size=spec.image_size or _pair(visual.image_size),
        mean=spec.mean or tuple(visual.preprocess_cfg["mean"]),
        std=spec.std or tuple(visual.preprocess_cfg["std"]),
        embed_dim=embed_dim,
        logit_scale_init=logit_scale,
    )


def _build_open_clip(
    arch: str, pretrained: str | None, image_size: tuple[int, int] | None, preprocess: dict, token: bool = False
) -> nn.Module:
    """Resolve weights first (fails fast), then build the full CLIP model and load them. The weights'
    mean/std (a tag's config, else the hub config's) end up in `model.visual.preprocess_cfg`; tags
    trained with QuickGELU (OpenAI's) get it. `token`: a checkpoint may lack the image projection."""
    import open_clip

    path, tag_cfg = _resolve_open_clip_weights(arch, pretrained)
    keep = ("mean", "std", "interpolation", "resize_mode")
    force_pp = {k: v for k, v in {**preprocess, **tag_cfg}.items() if k in keep}
    force_size = tuple(image_size) if image_size else None
    quiet = _quiet_random_init_warning() if path else contextlib.nullcontext()
    with quiet:  # weights are loaded below, not by open_clip
        model = open_clip.create_model(arch, pretrained=None, force_image_size=force_size, pretrained_text=False,
                                       force_preprocess_cfg=force_pp, force_quick_gelu=bool(tag_cfg.get("quick_gelu")))
    if path is not None:
        _load_open_clip_state(model, read_state_dict(path), path, arch, token)
    return model


def _load_open_clip_state(
    model: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str, token: bool = False
) -> None:
    """Load a full CLIP state dict, or an image-tower-only one (e.g. a fine-tuned embedder; without its
    projection when it was trained on the token embedding), with positional-embedding resizing."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import resize_pos_embed

    state = convert_state_dict(model, state)
    visual_keys = set(model.visual.state_dict())
    if not any(k.startswith("visual.") for k in state) and visual_keys & set(state):
        state = {f"visual.{k}": v for k, v in state.items()}  # an image-tower-only checkpoint
        skip = tuple(k for k in model.state_dict() if not k.startswith("visual."))
        if token:  # the projection (ViT `proj`, timm-trunk head/classifier) may be absent
            trunk = getattr(model.visual, "trunk", None)
            classifier = trunk.pretrained_cfg.get("classifier", "head") if trunk is not None else "head"
            heads = ("visual.proj", "visual.head.", f"visual.trunk.{classifier}.")
            skip += tuple(k for k in model.state_dict() if k.startswith(heads))
    else:
        skip = ()
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None and not skip:
        state["logit_bias"] = torch.zeros_like(model.logit_bias)
    resize_pos_embed(state, model)
    load_checked(model, state, path, f"open_clip:{arch}", optional=skip)


def _drop_projection(visual: nn.Module, arch: str) -> int:
    """Expose the pre-projection token: open_clip's own `prune_head` sets a ViT's `proj` to None; a timm
    trunk inside open_clip loses its projection head (or its classifier used as projection)."""
    if isinstance(getattr(visual, "proj", None), nn.Parameter):
        visual.proj = None
        return int(visual.ln_post.normalized_shape[0])
    trunk, head = getattr(visual, "trunk", None), getattr(visual, "head", None)
    if trunk is not None and isinstance(head, nn.Sequential) and "pool" not in head._modules:
        if len(head):
            visual.head = nn.Sequential()
        else:
            trunk.reset_classifier(0)
        return int(getattr(trunk, "head_hidden_size", None) or trunk.num_features)
    raise SubmitError(f"backbone 'open_clip:{arch}': embedding 'token' needs a ViT image tower; use 'projected'")


# ---------------------------------------------------------------- timm


def _timm_embedder(spec: BackboneSpec, name: str, pretrained: str | None) -> Embedder:
    import timm

    if not timm.is_model(name.split(".")[0]):
        raise SubmitError(f"backbone.name 'timm:{name}': unknown timm model (see timm.list_models())")
    path = _resolve_timm_weights(name, pretrained)
    model = _create_timm(name, spec.image_size)
    if path is not None:
        _load_timm_state(model, read_state_dict(path), path, name)
    cfg = model.pretrained_cfg
    native = tuple(cfg.get("input_size", (3, 224, 224))[1:])
    embed_dim = getattr(model, "head_hidden_size", None) or model.num_features
    return Embedder(
        model,
        name=spec.name,
        input_size=spec.image_size or native,
        mean=spec.mean or tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=spec.std or tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        embed_dim=int(embed_dim),
        logit_scale_init=CLIP_INIT_LOGIT_SCALE,
    )


def _create_timm(name: str, image_size: tuple[int, int] | None) -> nn.Module:
    """A timm model with pooled features (no classifier); ViT-like models take `img_size`."""
    import timm

    if image_size:
        try:
            return timm.create_model(name, pretrained=False, num_classes=0, img_size=tuple(image_size))
        except TypeError:  # CNNs take any input size and have no `img_size` argument
            pass
    return timm.create_model(name, pretrained=False, num_classes=0)


def _load_timm_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    """Apply the model family's checkpoint filter (pos-embed resize, format conversion), drop the
    classifier, then load with a shape check."""
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        with contextlib.suppress(Exception):  # a checkpoint it cannot convert is reported by load_checked
            state = filter_fn(state, model)
    own = model.state_dict()
    classifiers = model.pretrained_cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    state = {k: v for k, v in state.items() if k in own or not k.startswith(tuple(f"{c}." for c in classifiers))}
    load_checked(model, state, path, f"timm:{name}")


# ---------------------------------------------------------------- weight resolution


def _resolve_open_clip_weights(arch: str, pretrained: str | None) -> tuple[Path | None, dict]:
    """(checkpoint file or None, the tag's preprocessing config) for an open_clip `pretrained` value."""
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    if not pretrained:
        return None, {}
    if pretrained.startswith(HF_HUB):
        return _hub_file(pretrained[len(HF_HUB):], _OPEN_CLIP_FILES), {}
    tag_cfg = get_pretrained_cfg(arch, pretrained)
    if tag_cfg:
        return _tag_file(arch, pretrained, tag_cfg), tag_cfg
    if _looks_like_path(pretrained):
        return _local_file(pretrained), {}
    tags = ", ".join(list_pretrained_tags_by_model(arch)) or "none"
    raise SubmitError(
        f"pretrained {pretrained!r}: not an open_clip tag for {arch} (known: {tags}), not hf-hub:<org>/<repo> "
        f"and not an existing checkpoint file"
    )


def _resolve_timm_weights(name: str, pretrained: str | None) -> Path | None:
    """Checkpoint file for a timm `pretrained` value: `timm` (default weights), hf-hub:, or a file."""
    import timm

    if not pretrained:
        return None
    if pretrained.startswith(HF_HUB):
        return _hub_file(pretrained[len(HF_HUB):], _TIMM_FILES)
    if pretrained.lower() in TIMM_DEFAULT_TAGS:
        cfg = timm.models.get_pretrained_cfg(name)
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
        if cfg.get("hf_hub_id"):
            files = (cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else _TIMM_FILES
            return _hub_file(cfg["hf_hub_id"], files)
        if cfg.get("url"):
            return _url_file(cfg["url"], Path(torch.hub.get_dir()) / "checkpoints", f"timm:{name}")
        raise SubmitError(f"backbone 'timm:{name}': timm has no default weights for it; "
                          f"use hf-hub:<org>/<repo> {LOCAL_FILE_HINT}")
    if _looks_like_path(pretrained):
        return _local_file(pretrained)
    raise SubmitError(
        f"pretrained {pretrained!r} for timm:{name}: expected 'timm' (default weights), hf-hub:<org>/<repo> "
        f"or an existing checkpoint file"
    )


_OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_TIMM_FILES = ("model.safetensors", "pytorch_model.bin")


def _tag_file(arch: str, tag: str, cfg: dict) -> Path:
    """The file of an open_clip pretrained tag: the HF cache, then OpenAI/open_clip's URL cache
    (~/.cache/clip), then a download when the host is reachable."""
    what = f"open_clip {arch} '{tag}' weights"
    if cfg.get("file"):
        return _local_file(cfg["file"])
    url_cache = Path("~/.cache/clip").expanduser()
    url_target = url_cache / os.path.basename(urlparse(cfg["url"]).path) if cfg.get("url") else None
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" (default file) or "org/repo/file"
        files = (filename[:-4] + ".safetensors", filename) if filename.endswith((".bin", ".pth")) else (
            (filename,) if filename else _OPEN_CLIP_FILES)
        hit = _hub_cached(repo, files)
        if hit is not None:
            return hit
        if url_target is not None and url_target.is_file():
            return url_target
        return _hub_file(repo, files, what=what)
    return _url_file(cfg["url"], url_cache, what)


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


def _hub_file(repo: str, filenames: tuple[str, ...], what: str | None = None) -> Path:
    """First of `filenames` in hub repo `repo`: from the local cache, else downloaded if reachable."""
    from huggingface_hub import hf_hub_download

    if repo.count("/") > 1:  # hf-hub:<org>/<repo>/<file>
        repo, filename = repo.rsplit("/", 1)
        filenames = (filename,)
    what = what or f"hf-hub:{repo}"
    hit = _hub_cached(repo, filenames)
    if hit is not None:
        return hit
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
        f"connected machine (or point HF_HOME at a copied cache), {LOCAL_FILE_HINT}"
    )


def _url_file(url: str, cache: Path, what: str) -> Path:
    """A URL-hosted checkpoint: from `cache`, else downloaded when the host is reachable."""
    target = cache / os.path.basename(urlparse(url).path)
    if target.is_file():
        return target
    if hub_offline() or not _reachable(url):
        raise SubmitError(f"{what}: not in the cache ({target}) and {url} is unreachable; download it on a connected "
                          f"machine, {LOCAL_FILE_HINT}")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".part")
    try:
        torch.hub.download_url_to_file(url, str(tmp), progress=True)
    except Exception as exc:  # noqa: BLE001
        reason = _first_line(exc)
        raise SubmitError(f"{what}: download from {url} failed ({reason}); retry, {LOCAL_FILE_HINT}") from None
    os.replace(tmp, target)
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


def _local_file(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise SubmitError(f"pretrained checkpoint {path}: file not found")
    return path


def _loadable(filename: str) -> bool:
    """Safetensors files need the optional `safetensors` package."""
    if not filename.endswith(".safetensors"):
        return True
    try:
        import safetensors  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- checkpoint loading


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, loaded with weights_only=True: plain state dicts, {'state_dict': ...},
    our training checkpoints ({'ema'|'model': Embedder state}), with 'module.' (DDP) and 'model.'
    (Embedder) prefixes stripped; OpenAI's TorchScript CLIP archives are read with torch.jit.load."""
    path = Path(path)
    if not path.is_file():
        raise SubmitError(f"checkpoint {path}: file not found")
    try:
        data = _load_tensors(path)
    except ImportError:
        raise SubmitError(f"checkpoint {path}: reading .safetensors needs the 'safetensors' package") from None
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors become one line
        reason = _first_line(exc)
        raise SubmitError(f"checkpoint {path}: cannot be read as a weights-only torch file ({reason})") from None
    for key in ("state_dict", "ema", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise SubmitError(f"checkpoint {path}: expected a state dict of tensors")
    for prefix in ("module.", "model."):
        if all(k.startswith(prefix) for k in data):
            data = {k[len(prefix):]: v for k, v in data.items()}
    return data


def _load_tensors(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if _is_torchscript(path):
        with warnings.catch_warnings():  # torch marks torch.jit as deprecated; OpenAI's original CLIP files need it
            warnings.simplefilter("ignore", FutureWarning)
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        return {k: v for k, v in state.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    return torch.load(path, map_location="cpu", weights_only=True)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def load_checked(
    module: nn.Module, state: dict[str, torch.Tensor], path: str | Path, model_name: str, optional: tuple[str, ...] = ()
) -> None:
    """`module.load_state_dict(state)` with a one-line error listing what does not fit.

    Keys in `optional` may be absent from `state` (e.g. the text tower for an image-only checkpoint)."""
    own = module.state_dict()
    problems = []
    for key, value in state.items():
        if key not in own:
            problems.append(f"unexpected {key}")
        elif tuple(value.shape) != tuple(own[key].shape):
            problems.append(f"{key} {list(value.shape)} vs {list(own[key].shape)}")
    problems += [f"missing {key}" for key in own if key not in state and key not in optional]
    if problems:
        raise SubmitError(
            f"checkpoint {path} does not fit model {model_name}: {len(problems)} mismatched tensors, e.g. {problems[0]}"
        )
    module.load_state_dict(state, strict=not optional)


# ---------------------------------------------------------------- small helpers


class _DropRandomInit(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    """open_clip logs 'Model initialized randomly' on the root logger even when we load weights next."""
    root = logging.getLogger()
    flt = _DropRandomInit()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _pair(size: Any) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))


@torch.no_grad()
def _probe_dim(module: nn.Module, image_size: Any) -> int:
    """Output width by a one-image forward pass (for towers that do not state it)."""
    was_training = module.training
    module.eval()
    h, w = _pair(image_size)
    dim = int(module(torch.zeros(1, 3, h, w)).shape[-1])
    module.train(was_training)
    return dim


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


register_tiny_models()
