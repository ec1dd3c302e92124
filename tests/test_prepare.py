"""`prepare` end to end on generated sources: official zip/folder, Market-1501, folder-per-identity, bad inputs."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from submit import prepare as prep
from submit.cli import main
from submit.errors import SubmitError
from submit.manifest import COLUMNS, read_manifest, select
from submit.synthetic import make_dataset

PLAYERS, SEQS, FRAMES = 10, 2, 2  # 6 train ids, 2 test ids, 2 challenge ids; 4 crops each


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("synth")
    folder = make_dataset(base / "folder", players=PLAYERS, seqs=SEQS, frames=FRAMES, seed=1)
    zpath = make_dataset(base / "official.zip", players=PLAYERS, seqs=SEQS, frames=FRAMES, seed=1, as_zip=True)
    return {"folder": folder, "zip": zpath}


def run(source, out, **kw) -> prep.PrepareResult:
    return prep.prepare(source, out, progress=False, **kw)


def counts(result: prep.PrepareResult) -> dict[tuple[str, str], tuple[int, int | None]]:
    return {(r.split, r.role): (r.images, r.identities) for r in result.summary}


def assert_nothing_left(parent: Path, keep: set[str] = frozenset()) -> None:
    """The no-partial-output guarantee: no DATA_DIR, no temp folders beside it."""
    assert {p.name for p in parent.iterdir()} <= set(keep)


def jpeg(path: Path, colour=(200, 30, 30), size=(16, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG")


def copy_zip(src: Path, dst: Path, extra: dict[str, bytes] | None = None, drop: str | None = None) -> Path:
    """Rewrite a zip, optionally adding raw-named members or dropping those containing `drop`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if drop is None or drop not in info.filename:
                zout.writestr(info, zin.read(info))
        for name, data in (extra or {}).items():
            zout.writestr(zipfile.ZipInfo(name), data)
    return dst


# ---- official layout -------------------------------------------------------------------------------


def test_official_zip_manifest_images_and_numbers(synth, tmp_path):
    out = tmp_path / "data"
    result = run(synth["zip"], out)
    assert result.layout == "official" and result.data_dir == out
    assert result.release.startswith("note: official.zip is not an official release (md5 ")
    per_id = SEQS * FRAMES
    assert counts(result) == {("train", "train"): (6 * per_id, 6), ("test", "query"): (2, 2),
                              ("test", "gallery"): (2 * per_id - 2, 2), ("challenge", "query"): (2, None),
                              ("challenge", "gallery"): (2 * per_id - 2, None)}
    df = read_manifest(out)
    assert list(df.columns) == COLUMNS and all((out / p).is_file() for p in df["path"])
    with zipfile.ZipFile(synth["zip"]) as zf:
        assert (out / "images/reid_training/1_1_0.jpeg").read_bytes() == zf.read("data_reid/reid_training/1_1_0.jpeg")
    gallery = select(df, "test", "gallery")
    assert (gallery["image_id"] == gallery["pid"]).all() and gallery["image_id"].duplicated().any()
    challenge = select(df, "challenge", "gallery")
    assert challenge["image_id"].tolist() == list(range(len(challenge))) and (challenge["pid"] == -1).all()
    # numbers.csv is copied verbatim; its paths are relative to images/ (the old data_reid/)
    numbers = pd.read_csv(out / "numbers.csv")
    assert sorted("images/" + numbers["path"]) == sorted(df["path"])
    assert_nothing_left(tmp_path, {"data"})


def test_official_folder_gives_the_same_manifest_as_the_zip(synth, tmp_path):
    a, b = run(synth["zip"], tmp_path / "a"), run(synth["folder"], tmp_path / "b")
    assert b.release is None
    pd.testing.assert_frame_equal(read_manifest(a.data_dir), read_manifest(b.data_dir))


def test_official_release_is_recognised_by_md5(synth, tmp_path, monkeypatch):
    monkeypatch.setitem(prep.RELEASES, prep.md5sum(synth["zip"]), "2099")
    result = run(synth["zip"], tmp_path / "data")
    assert result.release == f"official 2099 release of synergyreid_data.zip (md5 {prep.md5sum(synth['zip'])})"


def test_shared_zip_counts(shared_zip, tmp_path):
    result = run(shared_zip, tmp_path / "data")
    assert counts(result) == {("train", "train"): (2515, 356), ("test", "query"): (50, 50),
                              ("test", "gallery"): (255, 50), ("challenge", "query"): (200, None),
                              ("challenge", "gallery"): (1133, None)}


# ---- user layouts ----------------------------------------------------------------------------------


def test_market_layout_from_jpegs(tmp_path):
    root = tmp_path / "Market-1501"
    for name in ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg", "0003_c1s1_000100_01.jpg"]:
        jpeg(root / "bounding_box_train" / name)
    for name in ["0007_c1s1_001051_00.jpg", "0007_c2s1_001151_00.jpg"]:
        jpeg(root / "query" / name)
    for name in ["-1_c1s1_000401_03.jpg", "0000_c1s1_000151_01.jpg", "0007_c3s1_001251_03.jpg"]:
        jpeg(root / "bounding_box_test" / name)
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"\0junk")
    result = run(tmp_path, tmp_path / "data")
    assert result.layout == "market"
    assert counts(result) == {("train", "train"): (3, 2), ("test", "query"): (2, 1), ("test", "gallery"): (2, 1)}
    gallery = select(read_manifest(tmp_path / "data"), "test", "gallery")
    assert gallery[["pid", "seq", "image_id"]].values.tolist() == [[-1, 1, -1], [7, 3, 7]]
    assert (tmp_path / "data" / "images/bounding_box_test/-1_c1s1_000401_03.jpg").is_file()
    assert not (tmp_path / "data" / "images/bounding_box_test/0000_c1s1_000151_01.jpg").exists()


def test_folder_per_identity_layout_via_cli(tmp_path):
    src = tmp_path / "people"
    for i in range(10):
        for k in range(3):
            jpeg(src / f"{i + 1}" / f"{k}.jpg", colour=(20 * i, 10 * k, 90))
    res = CliRunner().invoke(main, ["prepare", str(src), "--out", str(tmp_path / "data"), "--layout", "folders",
                                    "--query-fraction", "0.2", "--seed", "5"])
    assert res.exit_code == 0, res.output
    assert "folders layout" in res.output and "wrote" in res.output
    df = read_manifest(tmp_path / "data")
    assert len(select(df, "test", "query")) == 2 and len(select(df, "test", "gallery")) == 4
    assert df[df.split == "train"].pid.nunique() == 8


# ---- bad input -------------------------------------------------------------------------------------


def test_truncated_zip(synth, tmp_path):
    bad = tmp_path / "cut.zip"
    bad.write_bytes(synth["zip"].read_bytes()[:-5000])
    with pytest.raises(SubmitError, match=r"cut\.zip: not a readable zip \(truncated or corrupt\?"):
        run(bad, tmp_path / "data")
    assert_nothing_left(tmp_path, {"cut.zip"})


@pytest.mark.parametrize("member", ["../evil.jpeg", "/abs/evil.jpeg", "data_reid/../../evil.jpeg", "C:/evil.jpeg"])
def test_zip_slip_members_are_refused(synth, tmp_path, member):
    bad = copy_zip(synth["zip"], tmp_path / "slip.zip", extra={member: b"x"})
    with pytest.raises(SubmitError, match=rf"slip\.zip: unsafe member name '{member}'"):
        run(bad, tmp_path / "out" / "data")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.jpeg").exists()


def test_corrupt_member_data_in_zip(synth, tmp_path):
    raw = bytearray(synth["zip"].read_bytes())
    with zipfile.ZipFile(synth["zip"]) as zf:
        info = zf.getinfo("data_reid/reid_training/2_1_1.jpeg")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    raw[start + 200: start + 260] = b"\xff" * 60  # stored member: breaks its CRC
    bad = tmp_path / "crc.zip"
    bad.write_bytes(bytes(raw))
    with pytest.raises(SubmitError, match=r"crc\.zip: member data_reid/reid_training/2_1_1\.jpeg cannot be read"):
        run(bad, tmp_path / "out" / "data")
    assert not (tmp_path / "out").exists()


def test_bad_file_name_in_zip(synth, tmp_path):
    bad = copy_zip(synth["zip"], tmp_path / "name.zip", extra={"data_reid/reid_test/gallery/x7.jpeg": b"x"})
    with pytest.raises(SubmitError, match=r"data_reid/reid_test/gallery/x7\.jpeg: expected a name like"):
        run(bad, tmp_path / "out" / "data")
    assert not (tmp_path / "out").exists()


def test_missing_split_folder_in_zip(synth, tmp_path):
    bad = copy_zip(synth["zip"], tmp_path / "miss.zip", drop="reid_challenge/gallery/")
    with pytest.raises(SubmitError, match=r"miss\.zip: missing data_reid/reid_challenge/gallery/"):
        run(bad, tmp_path / "out" / "data")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_jpeg_in_folder(synth, tmp_path, damage):
    src = shutil.copytree(synth["folder"], tmp_path / "src")
    victim = src / "data_reid/reid_test/gallery/8_2_1.jpeg"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a jpeg at all")
    with pytest.raises(SubmitError, match=r"src: data_reid/reid_test/gallery/8_2_1\.jpeg: not a decodable image"):
        run(src, tmp_path / "out" / "data", workers=2)
    assert not (tmp_path / "out").exists()


def test_missing_source_and_not_a_folder_out(synth, tmp_path):
    with pytest.raises(SubmitError, match=r"nope\.zip: no such zip or folder \(pass --download"):
        run(tmp_path / "nope.zip", tmp_path / "data")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SubmitError, match=r"file: exists and is not a folder"):
        run(synth["zip"], tmp_path / "file")


# ---- DATA_DIR handling -----------------------------------------------------------------------------


def test_non_empty_out_needs_force_and_a_failed_force_keeps_the_old_data(synth, tmp_path):
    out = tmp_path / "out" / "data"
    run(synth["zip"], out)
    before = (out / "manifest.csv").read_bytes()
    with pytest.raises(SubmitError, match=r"data: folder is not empty; pass --force"):
        run(synth["zip"], out)
    bad = tmp_path / "cut.zip"
    bad.write_bytes(synth["zip"].read_bytes()[:1000])
    with pytest.raises(SubmitError, match="not a readable zip"):
        run(bad, out, force=True)
    assert (out / "manifest.csv").read_bytes() == before
    (out / "stale.txt").write_text("old")
    run(synth["folder"], out, force=True)
    assert not (out / "stale.txt").exists() and (out / "manifest.csv").read_bytes() == before
    assert_nothing_left(tmp_path / "out", {"data"})


def test_empty_out_is_filled(synth, tmp_path):
    (tmp_path / "data").mkdir()
    run(synth["zip"], tmp_path / "data")
    assert (tmp_path / "data" / "manifest.csv").is_file()
    assert_nothing_left(tmp_path, {"data"})


def test_source_inside_out_is_refused(synth, tmp_path):
    src = shutil.copytree(synth["folder"], tmp_path / "data" / "src")
    with pytest.raises(SubmitError, match="SOURCE lies inside DATA_DIR"):
        run(src, tmp_path / "data", force=True)
    assert (src / "numbers.csv").is_file()


# ---- download --------------------------------------------------------------------------------------


def test_download_fails_fast_without_network(tmp_path):
    dest = tmp_path / "dl" / "synergyreid_data.zip"
    with pytest.raises(SubmitError, match=r"http://127\.0\.0\.1:9/x\.zip: download failed \(.*\); fetch the zip"):
        prep.prepare(dest, tmp_path / "data", fetch=True, url="http://127.0.0.1:9/x.zip", progress=False)
    assert not dest.exists() and not (dest.parent / (dest.name + ".part")).exists()
    assert not (tmp_path / "data").exists()


def test_download_streams_to_source_then_prepares(synth, tmp_path):
    dest = tmp_path / "dl" / "synergyreid_data.zip"
    result = prep.prepare(dest, tmp_path / "data", fetch=True, url=synth["zip"].as_uri(), progress=False)
    assert dest.read_bytes() == synth["zip"].read_bytes()
    assert result.summary[0].images == 6 * SEQS * FRAMES


def test_cli_error_is_one_line_exit_2(tmp_path):
    res = CliRunner().invoke(main, ["prepare", str(tmp_path / "missing.zip"), "--out", str(tmp_path / "d")])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and "error: " in res.output and "missing.zip" in res.output
