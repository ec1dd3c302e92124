"""Checkpoint files -> state dicts -> a model: the one home of reading weights and checking that they fit.

`read_state_dict` reads every format users download (plain/nested torch files, safetensors, OpenAI's
TorchScript CLIP archives, our training checkpoints). `load_checked` loads by key name and names what does
not fit; `load_by_order` is the checked fallback for third-party files whose key names differ from the
architecture's but whose tensors correspond one to one, in order and shape (e.g. torchvision vs timm).
"""

from __future__ import annotations

import logging
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from submit.errors import SubmitError, first_line

log = logging.getLogger(__name__)

# Names of classifier layers that a checkpoint may carry and a feature tower (num_classes=0) does not.
CLASSIFIER_PREFIXES = ("classifier.", "fc.", "head.fc.", "last_linear.", "head.weight", "head.bias")


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
        raise SubmitError(f"checkpoint {path}: cannot be read as a weights-only torch file ({first_line(exc)})") from None
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


def names_match(state: dict[str, torch.Tensor], module: nn.Module) -> bool:
    """True when most of `state`'s tensors are named like the module's: then a misfit is reported by name
    (a wrong architecture), and only a checkpoint under other names is mapped by order."""
    return 2 * len(set(state) & set(module.state_dict())) >= len(state)


def map_by_order(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], path: str | Path, model_name: str,
    classifiers: tuple[str, ...] = CLASSIFIER_PREFIXES,
) -> dict[str, torch.Tensor]:
    """`state` renamed to `own`'s keys by position, after dropping the checkpoint's classifier tensors.

    Checked: both must have the same number of tensors and every pair the same shape; otherwise one line
    naming the first checkpoint tensor that has no counterpart."""
    source = [(k, v) for k, v in state.items() if not k.startswith(classifiers)]
    target = list(own.items())
    for i in range(max(len(source), len(target))):
        if i >= len(source):
            raise SubmitError(f"checkpoint {path} does not fit model {model_name} by name or by order: it ends after "
                              f"{len(source)} tensors, the model's tensor {i} {target[i][0]!r} has no counterpart")
        key, value = source[i]
        if i >= len(target):
            raise SubmitError(f"checkpoint {path} does not fit model {model_name} by name or by order: its tensor {i} "
                              f"{key!r} has no counterpart (the model has {len(target)} tensors)")
        if tuple(value.shape) != tuple(target[i][1].shape):
            raise SubmitError(f"checkpoint {path} does not fit model {model_name} by name or by order: its tensor {i} "
                              f"{key!r} {list(value.shape)} vs the model's {target[i][0]!r} {list(target[i][1].shape)}")
    return {name: value for (name, _), (_, value) in zip(target, source)}


def load_state(module: nn.Module, state: dict[str, torch.Tensor], path: str | Path, model_name: str,
               optional: tuple[str, ...] = ()) -> None:
    """Load by name when the key names are the module's; else by a checked order-and-shape mapping (logged).

    A .safetensors file keeps no tensor order (it stores them sorted by name), so it is only loaded by name:
    mapping it by order would misreport a wrong architecture's first misfit."""
    if not names_match(state, module) and not optional and not str(path).endswith(".safetensors"):
        state = map_by_order(state, module.state_dict(), path, model_name)
        log.warning("checkpoint %s: key names differ from %s; loaded by order and shape (%d tensors, checked)",
                    path, model_name, len(state))
    load_checked(module, state, path, model_name, optional)
