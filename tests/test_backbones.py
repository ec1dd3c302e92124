"""Model factory: tiny random models, checkpoint files written here, offline errors. No downloads."""

from __future__ import annotations

import time
from pathlib import Path

import open_clip
import pytest
import timm
import torch

from submit.backbones import TINY_VIT, build_embedder, load_clip
from submit.checkpoints import read_state_dict
from submit.errors import SubmitError
from submit.recipe import BackboneSpec

torch.set_num_threads(2)
TINY = f"open_clip:{TINY_VIT}"


def _batch(embedder, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, *embedder.input_size)


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    """No hub: offline flag set and an empty cache, so nothing can be found or downloaded."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf" / "hub"


def test_tiny_vit_projected_and_token_dims():
    projected = build_embedder(BackboneSpec(TINY))
    token = build_embedder(BackboneSpec(TINY, embedding="token"))
    assert projected.embed_dim == 32 and projected(_batch(projected)).shape == (2, 32)
    assert token.embed_dim == 64 and token(_batch(token)).shape == (2, 64)
    assert token.model.proj is None
    assert projected.input_size == (32, 32)
    assert projected.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert projected.logit_scale_init == pytest.approx(1 / 0.07, rel=1e-5)


def test_feature_maps_shapes():
    vit = build_embedder(BackboneSpec(TINY, image_size=(64, 32)))
    cnn = build_embedder(BackboneSpec("timm:resnet10t", image_size=(64, 32)))
    assert vit.feature_maps(_batch(vit)).shape == (2, 64, 8, 4)  # patch 8 grid, CLS dropped
    assert cnn.feature_maps(_batch(cnn)).shape == (2, 512, 2, 1)  # stride 32
    assert cnn(_batch(cnn)).shape == (2, cnn.embed_dim) and cnn.embed_dim == 512
    assert cnn.logit_scale_init == pytest.approx(1 / 0.07)


def test_image_size_override_resizes_vit():
    native = build_embedder(BackboneSpec(TINY))
    tall = build_embedder(BackboneSpec(TINY, image_size=(64, 32)))
    assert tall.input_size == (64, 32)
    assert tall.model.positional_embedding.shape[0] == 8 * 4 + 1
    assert native.model.positional_embedding.shape[0] == 4 * 4 + 1
    assert tall(_batch(tall)).shape == (2, 32)


def test_spec_mean_std_override():
    spec = BackboneSpec("timm:resnet10t", image_size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    e = build_embedder(spec)
    assert e.mean == (0.5, 0.5, 0.5) and e.std == (0.25, 0.25, 0.25)


def test_grad_checkpointing_forward_backward():
    for spec in (BackboneSpec(TINY), BackboneSpec("timm:resnet10t", image_size=(32, 32))):
        e = build_embedder(spec).train()
        e.set_grad_checkpointing(True)
        e(_batch(e)).pow(2).sum().backward()
        grads = [p.grad for p in e.parameters() if p.requires_grad]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_open_clip_full_checkpoint_round_trip(tmp_path):
    source = open_clip.create_model(TINY_VIT)
    with torch.no_grad():
        source.logit_scale.fill_(4.0)
    path = tmp_path / "clip.pt"
    wrapped = {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}  # DDP-style
    torch.save(wrapped, path)
    e = build_embedder(BackboneSpec(TINY, pretrained=str(path)))
    for key, value in source.visual.state_dict().items():
        assert torch.equal(e.model.state_dict()[key], value), key
    assert e.logit_scale_init == pytest.approx(torch.tensor(4.0).exp().item(), rel=1e-5)
    clip, tokenizer = load_clip(TINY_VIT, str(path))
    assert torch.equal(clip.token_embedding.weight, source.token_embedding.weight)
    assert clip.encode_text(tokenizer(["number 23"])).shape == (1, 32)


def test_open_clip_checkpoint_at_other_size_resizes_pos_embed(tmp_path):
    source = open_clip.create_model(TINY_VIT)
    path = tmp_path / "clip.pt"
    torch.save(source.state_dict(), path)
    e = build_embedder(BackboneSpec(TINY, pretrained=str(path), image_size=(64, 32), embedding="token"))
    assert torch.equal(e.model.conv1.weight, source.visual.conv1.weight)
    assert e.model.positional_embedding.shape == (33, 64)
    assert torch.equal(e.model.positional_embedding[0], source.visual.positional_embedding[0])  # CLS kept


def test_visual_only_checkpoint_loads(tmp_path):
    source = open_clip.create_model(TINY_VIT).visual
    path = tmp_path / "visual.pt"
    torch.save(source.state_dict(), path)
    e = build_embedder(BackboneSpec(TINY, pretrained=str(path)))
    assert torch.equal(e.model.proj, source.proj)


def test_timm_checkpoint_round_trip_drops_classifier(tmp_path):
    source = timm.create_model("resnet10t", pretrained=False)  # with its 1000-class head
    path = tmp_path / "resnet.pth"
    torch.save(source.state_dict(), path)
    e = build_embedder(BackboneSpec("timm:resnet10t", pretrained=str(path), image_size=(64, 32)))
    for key, value in e.model.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key
    assert "fc.weight" not in e.model.state_dict()


def test_wrong_architecture_checkpoint_is_one_line_error(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet10t", pretrained=False, num_classes=0).state_dict(), path)
    with pytest.raises(SubmitError, match=r"does not fit model timm:resnet18: \d+ mismatched tensors, e\.g\. ") as err:
        build_embedder(BackboneSpec("timm:resnet18", pretrained=str(path), image_size=(32, 32)))
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    wider = dict(open_clip.create_model(TINY_VIT).state_dict())
    wider["visual.proj"] = torch.zeros(64, 48)
    torch.save(wider, tmp_path / "wider.pt")
    with pytest.raises(SubmitError, match=r"1 mismatched tensors, e\.g\. visual\.proj \[64, 48\] vs \[64, 32\]"):
        build_embedder(BackboneSpec(TINY, pretrained=str(tmp_path / "wider.pt")))


def test_missing_and_unreadable_checkpoint_files(tmp_path):
    missing = tmp_path / "nope.bin"
    with pytest.raises(SubmitError, match=f"{missing}: file not found"):
        build_embedder(BackboneSpec(TINY, pretrained=str(missing)))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SubmitError, match=f"checkpoint {junk}: cannot be read"):
        read_state_dict(junk)


def test_offline_tag_fails_fast_with_local_file_hint(offline):
    start = time.perf_counter()
    with pytest.raises(SubmitError) as err:
        build_embedder(BackboneSpec("open_clip:ViT-B-32", pretrained="openai"))
    assert time.perf_counter() - start < 2.0  # no model built, no network retries
    message = str(err.value)
    assert str(offline) in message and "pretrained: /path/to/checkpoint.bin" in message and "\n" not in message
    with pytest.raises(SubmitError, match="hf-hub:org/repo: not in the Hugging Face cache"):
        build_embedder(BackboneSpec("timm:resnet10t", pretrained="hf-hub:org/repo"))
    with pytest.raises(SubmitError, match="pretrained: /path/to/checkpoint.bin"):
        build_embedder(BackboneSpec("timm:resnet10t", pretrained="timm"))
    with pytest.raises(SubmitError, match="pretrained: /path/to/checkpoint.bin"):
        load_clip("ViT-B-32", "openai")


def test_cached_hub_file_is_used_offline(offline):
    """A checkpoint in the HF cache layout is found without the network."""
    source = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    _cache_repo(offline, "org/tiny", {"pytorch_model.bin": source.state_dict()})
    e = build_embedder(BackboneSpec("timm:resnet10t", pretrained="hf-hub:org/tiny", image_size=(32, 32)))
    assert torch.equal(e.model.conv1[0].weight, source.conv1[0].weight)


def test_bad_names_and_tags():
    with pytest.raises(SubmitError, match="expected 'open_clip:<model>' or 'timm:<model>'"):
        build_embedder(BackboneSpec("resnet50"))
    with pytest.raises(SubmitError, match="unknown open_clip model"):
        build_embedder(BackboneSpec("open_clip:ViT-Q-99"))
    with pytest.raises(SubmitError, match="unknown timm model"):
        build_embedder(BackboneSpec("timm:not_a_model"))
    with pytest.raises(SubmitError, match=r"not an open_clip tag for ViT-B-32 \(known: openai"):
        build_embedder(BackboneSpec("open_clip:ViT-B-32", pretrained="laion9000"))


def test_load_weights_false_skips_pretrained(tmp_path):
    e = build_embedder(BackboneSpec(TINY, pretrained=str(tmp_path / "absent.bin")), load_weights=False)
    assert e(_batch(e)).shape == (2, 32)


def test_read_state_dict_rejects_non_state_dicts(tmp_path: Path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(SubmitError, match="expected a state dict of tensors"):
        read_state_dict(path)


def _cache_repo(hub: Path, repo: str, files: dict[str, object]) -> None:
    """Write files into the Hugging Face cache layout (refs/main -> snapshots/<rev>/<file>)."""
    root = hub / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / "rev0"
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("rev0")
    for name, content in files.items():
        if isinstance(content, str):
            (snapshot / name).write_text(content)
        else:
            torch.save(content, snapshot / name)


def test_open_clip_hub_model_name_reads_cached_config(offline):
    import json

    from submit.backbones import TINY_VIT_CONFIG

    source = open_clip.create_model(TINY_VIT)
    config = {"model_cfg": TINY_VIT_CONFIG, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    _cache_repo(offline, "org/tiny-clip", {"open_clip_config.json": json.dumps(config),
                                           "open_clip_pytorch_model.bin": source.state_dict()})
    e = build_embedder(BackboneSpec("open_clip:hf-hub:org/tiny-clip", pretrained="hf-hub:org/tiny-clip"))
    assert e.mean == (0.5, 0.5, 0.5) and e.embed_dim == 32
    assert torch.equal(e.model.conv1.weight, source.visual.conv1.weight)
    clip, _ = load_clip("hf-hub:org/tiny-clip", None)
    assert tuple(clip.visual.preprocess_cfg["std"]) == (0.5, 0.5, 0.5)
    _cache_repo(offline, "org/broken", {"open_clip_config.json": "{not json"})
    with pytest.raises(SubmitError, match="not an open_clip model config"):
        build_embedder(BackboneSpec("open_clip:hf-hub:org/broken"))


def test_timm_tower_inside_open_clip_token_drops_projection(monkeypatch):
    from open_clip import factory

    from submit.backbones import TINY_VIT_CONFIG

    cfg = {"embed_dim": 32, "text_cfg": TINY_VIT_CONFIG["text_cfg"],
           "vision_cfg": {"timm_model_name": "resnet10t", "timm_model_pretrained": False, "timm_pool": "avg",
                          "timm_proj": "linear", "image_size": 32}}
    monkeypatch.setitem(factory._MODEL_CONFIGS, "reident-test-timm-tower", cfg)
    projected = build_embedder(BackboneSpec("open_clip:reident-test-timm-tower"))
    token = build_embedder(BackboneSpec("open_clip:reident-test-timm-tower", embedding="token"))
    assert projected(_batch(projected)).shape == (2, 32) and projected.embed_dim == 32
    assert token(_batch(token)).shape == (2, 512) and token.embed_dim == 512
    assert token.feature_maps(_batch(token)).shape == (2, 512, 1, 1)


def test_fine_tuned_token_embedder_checkpoint_reloads(tmp_path, monkeypatch):
    """A training-run checkpoint ({'model': Embedder state, ...}) can seed a new run as `pretrained`."""
    from open_clip import factory

    from submit.backbones import TINY_VIT_CONFIG

    cfg = {"embed_dim": 32, "text_cfg": TINY_VIT_CONFIG["text_cfg"],
           "vision_cfg": {"timm_model_name": "resnet10t", "timm_model_pretrained": False, "timm_pool": "avg",
                          "timm_proj": "linear", "image_size": 32}}
    monkeypatch.setitem(factory._MODEL_CONFIGS, "reident-test-timm-tower", cfg)
    for name in (TINY, "open_clip:reident-test-timm-tower"):
        trained = build_embedder(BackboneSpec(name, embedding="token"))
        path = tmp_path / "best.pt"
        torch.save({"model": trained.state_dict(), "ema": None, "recipe": {"name": "x"}}, path)
        again = build_embedder(BackboneSpec(name, embedding="token", pretrained=str(path)))
        for key, value in trained.state_dict().items():
            assert torch.equal(again.state_dict()[key], value), (name, key)


@pytest.mark.filterwarnings("ignore:`torch.jit.(save|script)` is deprecated:FutureWarning")
def test_torchscript_checkpoint_is_read(tmp_path):
    """OpenAI's original CLIP files are TorchScript archives; their tensors are read with torch.jit.load."""
    linear = torch.nn.Linear(3, 2)
    torch.jit.save(torch.jit.script(linear), str(tmp_path / "scripted.pt"))
    state = read_state_dict(tmp_path / "scripted.pt")
    assert torch.equal(state["weight"], linear.weight) and torch.equal(state["bias"], linear.bias)
