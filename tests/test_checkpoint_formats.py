"""The weight files users download, each written here in its exact on-disk format with a tiny model, loaded
through `backbone.pretrained: /path` (or the hub name from a local Hugging Face cache, offline): open_clip's
`open_clip_pytorch_model.bin` / `open_clip_model.safetensors`, timm's `model.safetensors` / `pytorch_model.bin`,
the HF cache layout (`models--org--repo/{blobs,refs/main,snapshots/<rev>/file}`), and OpenAI's CLIP `.pt`
TorchScript archives (tests/test_backbones.py covers the plain TorchScript reader and DDP-wrapped files)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file

from submit.backbones import TINY_VIT, build_embedder
from submit.errors import SubmitError
from submit.recipe import BackboneSpec

TINY = f"open_clip:{TINY_VIT}"
VISION = {"width": 64, "layers": 2, "patch": 8, "grid": 4, "embed_dim": 32}  # backbones.TINY_VIT_CONFIG
TEXT = {"width": 64, "layers": 2, "context": 77, "vocab": 49408}
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.(save|script)` is deprecated:FutureWarning")


@pytest.fixture()
def hub(monkeypatch, tmp_path) -> Path:
    """An offline Hugging Face cache at HF_HUB_CACHE (nothing else is reachable)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "unused-home"))
    return tmp_path / "hub"


def tiny_clip() -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.create_model(TINY_VIT)


def assert_tower_equal(embedder: torch.nn.Module, visual_state: dict[str, torch.Tensor]) -> None:
    for key, value in visual_state.items():
        assert torch.equal(embedder.model.state_dict()[key], value.float()), key


def write_hf_cache(root: Path, repo: str, files: dict[str, bytes], revision: str = "0" * 40) -> Path:
    """The HF cache layout as huggingface_hub writes it: blobs by hash, refs/main, snapshot symlinks."""
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "blobs").mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(revision)
    snapshot = base / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    return snapshot


def file_bytes(tmp_path: Path, name: str, state: dict[str, torch.Tensor]) -> bytes:
    path = tmp_path / "staging" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path)) if name.endswith(".safetensors") else torch.save(state, path)
    return path.read_bytes()


# ---- open_clip's and timm's files -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
def test_open_clip_files_load_by_path(name, tmp_path):
    source = tiny_clip()
    path = tmp_path / name
    path.write_bytes(file_bytes(tmp_path, name, source.state_dict()))
    e = build_embedder(BackboneSpec(TINY, pretrained=str(path)))
    assert_tower_equal(e, source.visual.state_dict())


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_timm_files_load_by_path_with_their_classifier(name, tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("resnet10t", pretrained=False)  # as on the hub: with the 1000-class head
    path = tmp_path / name
    path.write_bytes(file_bytes(tmp_path, name, source.state_dict()))
    e = build_embedder(BackboneSpec("timm:resnet10t", pretrained=str(path), image_size=(32, 32)))
    for key, value in e.model.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


# ---- a local Hugging Face cache -----------------------------------------------------------------------


@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HF_HOME"])
def test_hf_cache_folder_offline_open_clip_and_timm(env, hub, monkeypatch):
    if env == "HF_HOME":  # the cache is then HF_HOME/hub
        monkeypatch.delenv("HF_HUB_CACHE")
        monkeypatch.setenv("HF_HOME", str(hub.parent / "home"))
        hub = hub.parent / "home" / "hub"
    clip = tiny_clip()
    write_hf_cache(hub, "org/tiny-clip", {"open_clip_model.safetensors": file_bytes(hub.parent, "a.safetensors",
                                                                                     clip.state_dict())})
    e = build_embedder(BackboneSpec(TINY, pretrained="hf-hub:org/tiny-clip"))
    assert_tower_equal(e, clip.visual.state_dict())
    torch.manual_seed(1)
    cnn = timm.create_model("resnet10t", pretrained=False)
    write_hf_cache(hub, "org/tiny-timm", {"model.safetensors": file_bytes(hub.parent, "b.safetensors",
                                                                          cnn.state_dict())})
    e = build_embedder(BackboneSpec("timm:resnet10t", pretrained="hf-hub:org/tiny-timm", image_size=(32, 32)))
    assert torch.equal(e.model.conv1[0].weight, cnn.conv1[0].weight)
    snapshot = write_hf_cache(hub, "org/by-path", {"pytorch_model.bin": file_bytes(hub.parent, "c.bin",
                                                                                   cnn.state_dict())})
    e = build_embedder(BackboneSpec("timm:resnet10t", pretrained=str(snapshot / "pytorch_model.bin"),
                                    image_size=(32, 32)))  # a snapshot file (a symlink to its blob) by path
    assert torch.equal(e.model.conv1[0].weight, cnn.conv1[0].weight)


def test_folders_load_by_path_model_folder_snapshot_and_hub_repo_folder(hub, tmp_path):
    """`pretrained: /folder`: a downloaded model folder, an HF snapshot folder, or the models--org--repo folder
    (its refs/main picks the snapshot); each family looks for its own file names."""
    clip = tiny_clip()
    snapshot = write_hf_cache(hub, "org/tiny-clip", {"open_clip_model.safetensors": file_bytes(
        tmp_path, "a.safetensors", clip.state_dict()), "README.md": b"card"}, revision="1" * 40)
    old = snapshot.parent / ("2" * 40)  # an older snapshot beside it: refs/main decides
    old.mkdir()
    for folder in (snapshot, snapshot.parent.parent):
        e = build_embedder(BackboneSpec(TINY, pretrained=str(folder)))
        assert_tower_equal(e, clip.visual.state_dict())
    (snapshot.parent.parent / "refs" / "main").unlink()
    with pytest.raises(SubmitError, match="a folder without"):  # two snapshots and no refs/main: ambiguous
        build_embedder(BackboneSpec(TINY, pretrained=str(snapshot.parent.parent)))
    old.rmdir()  # one snapshot left: that one
    assert_tower_equal(build_embedder(BackboneSpec(TINY, pretrained=str(snapshot.parent.parent))),
                       clip.visual.state_dict())
    torch.manual_seed(1)
    cnn = timm.create_model("resnet10t", pretrained=False)
    plain = tmp_path / "downloaded-resnet10t"
    plain.mkdir()
    (plain / "pytorch_model.bin").write_bytes(file_bytes(tmp_path, "c.bin", cnn.state_dict()))
    e = build_embedder(BackboneSpec("timm:resnet10t", pretrained=str(plain), image_size=(32, 32)))
    assert torch.equal(e.model.conv1[0].weight, cnn.conv1[0].weight)
    with pytest.raises(SubmitError, match=r"a folder without model\.safetensors or pytorch_model\.bin") as err:
        build_embedder(BackboneSpec("timm:resnet10t", pretrained=str(snapshot), image_size=(32, 32)))
    assert "\n" not in str(err.value) and str(snapshot) in str(err.value)


def test_hf_cache_without_the_file_is_one_line_offline(hub):
    write_hf_cache(hub, "org/empty", {"README.md": b"nothing here"})
    with pytest.raises(SubmitError, match=r"hf-hub:org/empty: not in the Hugging Face cache") as err:
        build_embedder(BackboneSpec("timm:resnet10t", pretrained="hf-hub:org/empty"))
    assert "\n" not in str(err.value)


# ---- OpenAI's CLIP TorchScript archives ---------------------------------------------------------------


def openai_state(vision: dict = VISION, text: dict = TEXT) -> dict[str, torch.Tensor]:
    """A CLIP ViT state dict in OpenAI's key layout (clip/model.py), fp16 like the released files."""
    gen = torch.Generator().manual_seed(3)
    w, tw, e = vision["width"], text["width"], vision["embed_dim"]
    shapes: dict[str, tuple[int, ...]] = {
        "positional_embedding": (text["context"], tw), "text_projection": (tw, e), "logit_scale": (),
        "visual.class_embedding": (w,), "visual.positional_embedding": (vision["grid"] ** 2 + 1, w),
        "visual.proj": (w, e), "visual.conv1.weight": (w, 3, vision["patch"], vision["patch"]),
        "visual.ln_pre.weight": (w,), "visual.ln_pre.bias": (w,),
        "visual.ln_post.weight": (w,), "visual.ln_post.bias": (w,),
        "token_embedding.weight": (text["vocab"], tw), "ln_final.weight": (tw,), "ln_final.bias": (tw,)}
    for tower, width, layers in (("visual.transformer", w, vision["layers"]), ("transformer", tw, text["layers"])):
        for i in range(layers):
            p = f"{tower}.resblocks.{i}."
            shapes.update({
                p + "attn.in_proj_weight": (3 * width, width), p + "attn.in_proj_bias": (3 * width,),
                p + "attn.out_proj.weight": (width, width), p + "attn.out_proj.bias": (width,),
                p + "ln_1.weight": (width,), p + "ln_1.bias": (width,),
                p + "mlp.c_fc.weight": (4 * width, width), p + "mlp.c_fc.bias": (4 * width,),
                p + "mlp.c_proj.weight": (width, 4 * width), p + "mlp.c_proj.bias": (width,),
                p + "ln_2.weight": (width,), p + "ln_2.bias": (width,)})
    state = {k: (torch.randn(s, generator=gen) * 0.02).half() for k, s in shapes.items()}
    state["logit_scale"] = torch.tensor(4.6052, dtype=torch.float16)
    return state


class _Holder(torch.nn.Module):
    """A module tree whose state_dict is a given flat dict (what OpenAI's scripted CLIP looks like)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript(state: dict[str, torch.Tensor], path: Path, image_size: int = 32) -> None:
    """Save `state` (+ OpenAI's input_resolution/context_length/vocab_size buffers) as a TorchScript archive."""
    root = _Holder()
    extras = {"input_resolution": image_size, "context_length": TEXT["context"], "vocab_size": TEXT["vocab"]}
    for key, value in {**state, **{k: torch.tensor(v) for k, v in extras.items()}}.items():
        *parents, leaf = key.split(".")
        node = root
        for name in parents:
            if not hasattr(node, name):
                node.add_module(name, _Holder())
            node = getattr(node, name)
        if key in extras:
            node.register_buffer(leaf, value)
        else:
            node.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    torch.jit.save(torch.jit.script(root), str(path))


def test_openai_torchscript_clip_loads_by_path(tmp_path):
    state = openai_state()
    path = tmp_path / "ViT-tiny.pt"
    save_torchscript(state, path)
    import zipfile

    assert any(n.endswith("/constants.pkl") for n in zipfile.ZipFile(path).namelist())  # a real TorchScript zip
    e = build_embedder(BackboneSpec(TINY, pretrained=str(path)))
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    assert_tower_equal(e, visual)
    assert e.logit_scale_init == pytest.approx(float(state["logit_scale"].float().exp()), rel=1e-3)
    from submit.backbones import load_clip

    clip, tokenizer = load_clip(TINY_VIT, str(path))  # the text tower too (jersey numbers)
    assert torch.equal(clip.token_embedding.weight, state["token_embedding.weight"].float())
    assert clip.encode_text(tokenizer(["number 7"])).shape == (1, 32)


# ---- a file of the wrong architecture ---------------------------------------------------------------


def test_wrong_architecture_names_the_first_mismatched_tensor(tmp_path):
    wide = openai_state({**VISION, "width": 96})  # a wider tower than reident-tiny-vit
    save_torchscript(wide, tmp_path / "wide.pt")
    with pytest.raises(SubmitError) as err:
        build_embedder(BackboneSpec(TINY, pretrained=str(tmp_path / "wide.pt")))
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "wide.pt") in message
    assert "does not fit model open_clip:reident-tiny-vit" in message and "e.g. visual." in message
    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    path.write_bytes(file_bytes(tmp_path, "model.safetensors", timm.create_model("resnet18").state_dict()))
    with pytest.raises(SubmitError, match=r"does not fit model timm:resnet10t: \d+ mismatched tensors, e\.g\. "
                                          r"(unexpected |missing )?(conv1|bn1|layer)") as err:
        build_embedder(BackboneSpec("timm:resnet10t", pretrained=str(path), image_size=(32, 32)))
    assert "\n" not in str(err.value)  # by name: a .safetensors file has no tensor order to map by
