"""Model factory: open_clip and timm image towers behind one `Embedder` interface.

`build_embedder(spec)` turns a recipe's `BackboneSpec` into an `nn.Module` that maps a normalised
(B, 3, H, W) batch to (B, D) features and carries what the rest of the pipeline needs (input size,
normalisation, CLIP's logit scale, spatial feature maps for Score-CAM). `load_clip` returns the full
open_clip model with its text tower (zero-shot shirt-number reading).

Weights (`spec.pretrained`) are resolved by `submit.weights` BEFORE any model is built, so a missing
download fails at once with a one-line `SubmitError`; `submit.checkpoints` reads and fits the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from submit.checkpoints import load_checked, load_state, read_state_dict
from submit.errors import SubmitError, first_line
from submit.recipe import BackboneSpec
from submit.weights import HF_HUB, OPEN_CLIP, TIMM, hub_file, resolve_open_clip_weights, resolve_timm_weights

CLIP_INIT_LOGIT_SCALE = 1 / 0.07

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
        raise SubmitError(f"open_clip model {arch!r}: cannot load its tokenizer ({first_line(exc)})") from None
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
        path = hub_file(repo, ("open_clip_config.json",), what=f"open_clip config of {name}")
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

    path, tag_cfg = resolve_open_clip_weights(arch, pretrained)
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
    path = resolve_timm_weights(name, pretrained)
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
    load_state(model, state, path, f"timm:{name}")


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


register_tiny_models()
