"""ONNX export of a trained image tower, for trackers and services that do not run this toolkit.

The exported graph is the whole embedder a ranking file needs, with nothing left to the caller but resizing:

- input `images`: float32 RGB in [0, 1], NCHW, shape (batch, 3, H, W) at the recipe's input size
  (`backbone.image_size`; letterbox crops to it as `transforms.letterbox` does). The tower's mean/std
  normalisation is folded into the graph.
- output `embeddings`: float32 (batch, D), L2-normalised, so cosine distance is `1 - a @ b.T`.
- the batch axis is dynamic; `metadata_props` hold input_size, mean, std, embedding_dim, recipe, backbone,
  checkpoint, manifest (the fingerprint of the data the run trained on) and tta (the test-time augmentation the
  run predicts with: its recipe.yaml's `tta` section), all as strings (JSON for lists and mappings).

`OnnxEmbedder` puts such a file back behind the `Embedder` interface (onnxruntime), for `onnx:` ensemble members;
`member_tta` is the TTA such a member embeds with (the recorded one, so it ranks as the run member does; a file
exported before the TTA was recorded gets `TTASpec()`'s defaults, with a note). `read_metadata` is the validating
reader of the metadata (`submit.records`): each field checked, and against the graph (input size, output width);
a file that is not what it claims is one line naming the file and the field.
The classic TorchScript exporter is used (`dynamo=False`: no onnxscript needed); the file is written
atomically (submit.atomic). An operator the exporter cannot convert is named in one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from submit import atomic, config, records
from submit.errors import SubmitError, first_line
from submit.recipe import TTASpec, load_recipe

DEFAULT_OPSET = 17
MIN_OPSET = 14  # scaled-dot-product attention and the normalisation ops need 14+
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
INPUT_DOC = "float32 RGB in [0, 1], NCHW (batch, 3, H, W); mean/std normalisation is inside the graph"
_OP = re.compile(r"operator '([^']+)'|\b((?:aten|prim|onnx)::\w+)")


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What `export_onnx` wrote: the file and the metadata stored in it."""

    path: str
    opset: int
    input_size: tuple[int, int]
    embed_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    recipe: str
    backbone: str
    checkpoint: str
    manifest: str | None
    bytes: int
    tta: TTASpec = dataclasses.field(default_factory=TTASpec)


class NormalizedEmbedder(nn.Module):
    """[0, 1] RGB -> (x - mean) / std -> embedder -> L2-normalised float32 features (the exported graph)."""

    def __init__(self, embedder: nn.Module) -> None:
        super().__init__()
        self.embedder = embedder
        self.register_buffer("mean", torch.tensor(embedder.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(embedder.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.embedder((images - self.mean) / self.std)
        return nn.functional.normalize(feats.float(), dim=1)


def _onnx() -> Any:
    """The onnx package, or a one-line error saying how to install it (it is in the dev extra)."""
    try:
        import onnx
    except ImportError:
        raise SubmitError("export: the onnx package is not installed; pip install onnx "
                          "(or pip install -e '.[dev]')") from None
    return onnx


def export_onnx(run_dir: str | Path, out: str | Path, checkpoint: str = "best",
                opset: int = DEFAULT_OPSET) -> ExportResult:
    """Export RUN_DIR's trained tower to ONNX file `out` (see the module docstring for its contract)."""
    from submit.run_folder import checkpoint_path, recorded_manifest  # lazy for start-up: torch
    from submit.trained import load_trained

    max_opset = _max_opset()
    if not MIN_OPSET <= opset <= max_opset:
        raise SubmitError(f"--opset {opset}: expected {MIN_OPSET}..{max_opset} (the TorchScript exporter's range)")
    out = _check_out(Path(out))
    _onnx()
    path = checkpoint_path(run_dir, checkpoint)
    embedder, recipe = load_trained(run_dir, str(path))
    size_hw = (int(embedder.input_size[0]), int(embedder.input_size[1]))
    mean, std = tuple(embedder.mean), tuple(embedder.std)
    manifest = recorded_manifest(path)
    tta = predict_tta(run_dir, recipe.tta)
    meta = {"input_size": json.dumps(list(size_hw)), "mean": json.dumps(list(mean)), "std": json.dumps(list(std)),
            "embedding_dim": str(embedder.embed_dim), "recipe": recipe.name, "backbone": recipe.backbone.name,
            "checkpoint": str(path), "manifest": manifest or "", "tta": json.dumps(config.to_mapping(tta)),
            "input": INPUT_DOC, "output": "float32 (batch, embedding_dim), L2-normalised"}
    data = _to_onnx(NormalizedEmbedder(embedder).eval(), size_hw, opset, recipe.backbone.name)
    written = _write_with_metadata(data, out, meta)
    return ExportResult(str(out), opset, size_hw, int(embedder.embed_dim), mean, std,  # type: ignore[arg-type]
                        recipe.name, recipe.backbone.name, str(path), manifest, written, tta)


def predict_tta(run_dir: str | Path, recorded: TTASpec) -> TTASpec:
    """The TTA a `run:` member of RUN_DIR embeds with: its recipe.yaml's `tta` (what `predict` reads; it may have
    been edited after training), else the checkpoint's recipe's."""
    recipe_file = Path(run_dir) / "recipe.yaml"
    return load_recipe(recipe_file).tta if recipe_file.is_file() else recorded


def _check_out(out: Path) -> Path:
    """The output file path, refused early when it is a folder or its folder is missing."""
    if out.is_dir():
        raise SubmitError(f"--out {out}: is a folder, expected an .onnx file path")
    if not out.parent.is_dir():
        raise SubmitError(f"--out {out}: folder {out.parent} does not exist")
    return out


def _max_opset() -> int:
    """The highest opset the TorchScript exporter of this torch writes."""
    try:
        from torch.onnx import _constants

        return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET))
    except (ImportError, AttributeError):
        return 17


def _to_onnx(model: nn.Module, size_hw: tuple[int, int], opset: int, name: str) -> bytes:
    """Trace `model` at batch 2 with a dynamic batch axis; exporter failures become one line naming the op."""
    example = torch.rand(2, 3, *size_hw)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), _no_mha_fastpath():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
            torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              do_constant_folding=True)
    except Exception as exc:  # noqa: BLE001 - exporter errors vary by torch version; name the operator if any
        raise SubmitError(unsupported_message(exc, name, opset)) from None
    return buf.getvalue()


@contextlib.contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    """Trace nn.MultiheadAttention's plain ops: its inference fast path (`_native_multi_head_attention`,
    taken under no_grad) has no ONNX conversion."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def unsupported_message(exc: BaseException, backbone: str, opset: int) -> str:
    """One line for an export failure: the operator the exporter names, else the error's first line."""
    match = _OP.search(str(exc))
    if match:
        op = match.group(1) or match.group(2)
        return (f"backbone {backbone}: cannot export to ONNX opset {opset}: operator {op} is not supported "
                "by the exporter (try another --opset)")
    return f"backbone {backbone}: cannot export to ONNX opset {opset}: {first_line(exc)}"


def _write_with_metadata(data: bytes, out: Path, meta: dict[str, str]) -> int:
    """Add metadata_props and a graph doc string, check the model, write atomically; returns the size."""
    onnx = _onnx()
    model = onnx.load_from_string(data)
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = f"reident-submit embedder: input {INPUT_DOC}; output L2-normalised features"
    model.graph.input[0].doc_string = INPUT_DOC
    onnx.checker.check_model(model)
    with atomic.atomic_path(out) as tmp:  # submit.atomic: stale temps of a killed export removed, OSError one line
        onnx.save(model, str(tmp))
    return out.stat().st_size


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata_props of an exported file, each field checked (`submit.records`) and against the graph:
    input_size (2 positive ints, the graph's H, W where fixed), mean and std (3 finite numbers, std > 0),
    embedding_dim (a positive int, the graph's output width where fixed), tta (a recipe `tta` mapping; None for a
    file exported before it was recorded). One line naming the file and the field for a foreign or damaged file.
    Read once per version of the file (size, mtime, inode): predict asks for it per member and per split."""
    try:
        st = os.stat(path)
        version: tuple[int, int, int] | None = (st.st_size, st.st_mtime_ns, st.st_ino)
    except OSError:
        version = None
    return dict(_read_metadata(str(path), version))


@functools.lru_cache(maxsize=16)
def _read_metadata(path: str, version: tuple[int, int, int] | None) -> dict[str, Any]:
    """`read_metadata` of one version of the file (`version` only keys the cache)."""
    onnx = _onnx()
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf errors: the file is not ONNX
        raise SubmitError(f"{path}: not a readable ONNX file ({first_line(exc)})") from None
    props = {p.key: p.value for p in model.metadata_props}
    missing = [k for k in ("input_size", "mean", "std", "embedding_dim") if k not in props]
    if missing:
        raise SubmitError(f"{path}: not a reident-submit export (metadata lacks {', '.join(missing)})")
    meta = records.Record(props, path, "metadata")
    size = _numbers(meta, "input_size", 2, "a JSON list of 2 integers >= 1 (height, width)", integer=True)
    mean = _numbers(meta, "mean", 3, "a JSON list of 3 finite numbers")
    std = _numbers(meta, "std", 3, "a JSON list of 3 finite numbers > 0", positive=True)
    dim = meta.json_value("embedding_dim", "an integer >= 1")
    if not _positive_int(dim):
        raise meta.error("embedding_dim", "an integer >= 1", props["embedding_dim"])
    tta_raw = meta.json_value("tta", "a mapping of the recipe's tta fields", default=None)
    tta = None if tta_raw is None else config.from_mapping(TTASpec, tta_raw, where=f"{path}: metadata.tta")
    _check_graph(model, path, tuple(size), int(dim))
    return {**props, "input_size": tuple(size), "mean": tuple(mean), "std": tuple(std), "embedding_dim": int(dim),
            "tta": tta}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _numbers(meta: records.Record, key: str, n: int, expected: str, integer: bool = False,
             positive: bool = False) -> list:
    """A metadata field holding a JSON list of `n` numbers (ints >= 1 with `integer`, > 0 with `positive`)."""
    value = meta.json_value(key, expected)
    ok = isinstance(value, list) and len(value) == n and all(
        _positive_int(v) if integer else
        (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive))
        for v in value)
    if not ok:
        raise meta.error(key, expected, meta.get(key))
    return [int(v) for v in value] if integer else [float(v) for v in value]


def _check_graph(model: Any, path: str | Path, size_hw: tuple[int, int], dim: int) -> None:
    """The graph must take `images` (batch, 3, H, W) and give `embeddings` (batch, D) as the metadata says (axes
    left symbolic are not checked); a file whose metadata and graph disagree is refused naming both."""
    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name: o for o in graph.output}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise SubmitError(f"{path}: graph: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r} (a reident-submit "
                          f"export), got inputs {sorted(inputs)} and outputs {sorted(outputs)}")
    got_in, got_out = _dims(inputs[INPUT_NAME]), _dims(outputs[OUTPUT_NAME])
    if len(got_out) == 2 and got_out[1] is None:  # the exporter leaves the width symbolic: infer it
        got_out = _inferred_output(model) or got_out
    want_in: list[int | None] = [None, 3, *size_hw]
    if len(got_in) != 4 or any(g is not None and g != w for g, w in zip(got_in, want_in)):
        raise SubmitError(f"{path}: metadata.input_size: {list(size_hw)} disagrees with the graph's input "
                          f"{_shape(got_in)}; expected (batch, 3, {size_hw[0]}, {size_hw[1]})")
    if len(got_out) != 2 or (got_out[1] is not None and got_out[1] != dim):
        raise SubmitError(f"{path}: metadata.embedding_dim: {dim} disagrees with the graph's output "
                          f"{_shape(got_out)}; expected (batch, {dim})")


def _inferred_output(model: Any) -> list[int | None] | None:
    """The output's shape after ONNX shape inference (None when inference fails on this graph)."""
    try:
        inferred = _onnx().shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is a best-effort check; onnxruntime still checks at run time
        return None
    return next((_dims(o) for o in inferred.graph.output if o.name == OUTPUT_NAME), None)


def _dims(value_info: Any) -> list[int | None]:
    """A graph input's or output's shape: ints where fixed, None where symbolic or unknown."""
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


def _shape(dims: list[int | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def member_tta(path: str | Path) -> TTASpec:
    """The TTA an `onnx:` member embeds with before its own `tta:` override: the recorded one (the run's), else,
    for a file exported before the TTA was recorded, `TTASpec()`'s defaults with a one-line note (logged once)."""
    recorded = read_metadata(path)["tta"]
    if recorded is not None:
        return recorded
    _note_default_tta(str(path))
    return TTASpec()


@functools.cache
def _note_default_tta(path: str) -> None:
    defaults = config.to_mapping(TTASpec())
    logging.getLogger(__name__).info(
        f"note: {path} records no TTA (exported before the run's TTA was recorded); assuming the defaults "
        f"{json.dumps(defaults)}; export it again to embed as its run does")


class OnnxEmbedder(nn.Module):
    """An exported file behind the `Embedder` interface (input_size, mean, std, embed_dim, forward on
    normalised images), so `embedding.embed` and `predict` use it like a trained run: `onnx:` members."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        meta = read_metadata(path)
        self.name = f"onnx:{path}"
        self.input_size = tuple(int(v) for v in meta["input_size"])
        self.mean, self.std = tuple(meta["mean"]), tuple(meta["std"])
        self.embed_dim = int(meta["embedding_dim"])
        self.session = _session(path)
        self.register_buffer("_mean", torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("_std", torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, D) L2-normalised features (un-normalised back to [0, 1] first)."""
        images = (x.float() * self._std + self._mean).detach().cpu().numpy()
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
        if out.ndim != 2 or out.shape[1] != self.embed_dim:
            raise SubmitError(f"{self.name[len('onnx:'):]}: metadata.embedding_dim: {self.embed_dim} disagrees with "
                              f"the graph's output {tuple(out.shape)}; expected (batch, {self.embed_dim})")
        return torch.from_numpy(out).to(x.device)


def _session(path: str | Path) -> Any:
    """An onnxruntime session on CUDA when onnxruntime has it, else CPU; one line when it is missing."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise SubmitError(f"{path}: embedding with an ONNX member needs onnxruntime; pip install onnxruntime "
                          "(or pip install -e '.[dev]')") from None
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    try:
        return ort.InferenceSession(str(path), providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise SubmitError(f"{path}: onnxruntime cannot load it ({first_line(exc)})") from None
