"""Layout parsing on file lists alone (no I/O): official, Market-1501, folder-per-identity, auto-detection."""

from __future__ import annotations

import pytest

from submit.errors import SubmitError
from submit.layouts import Options, plan

OFFICIAL = [
    "numbers.csv",
    "data_reid/reid_training/3_1_0.jpeg",
    "data_reid/reid_training/3_1_1.jpeg",
    "data_reid/reid_training/4_2_0.jpeg",
    "data_reid/reid_test/query/7_1_0.jpeg",
    "data_reid/reid_test/gallery/7_1_1.jpeg",
    "data_reid/reid_test/gallery/7_1_10.jpeg",
    "data_reid/reid_test/gallery/7_1_2.jpeg",
    "data_reid/reid_challenge/query/00000.jpeg",
    "data_reid/reid_challenge/gallery/00000.jpeg",
    "data_reid/reid_challenge/gallery/00012.jpeg",
    "__MACOSX/data_reid/reid_training/._3_1_0.jpeg",
    "data_reid/reid_training/.DS_Store",
    "data_reid/reid_training/Thumbs.db",
]


def rows(p):
    return [(e.split, e.role, e.pid, e.seq, e.frame, e.image_id) for e in p.entries]


def test_official_fields_ids_and_destinations():
    p = plan(OFFICIAL, "auto", "src.zip")
    assert p.layout == "official" and p.root == "data_reid/"
    assert rows(p) == [
        ("train", "train", 3, 1, 0, 0), ("train", "train", 3, 1, 1, 1), ("train", "train", 4, 2, 0, 2),
        ("test", "query", 7, 1, 0, 7),
        # the official toolkit's order and ids: pid for every test image, file-name order within a pid
        ("test", "gallery", 7, 1, 1, 7), ("test", "gallery", 7, 1, 10, 7), ("test", "gallery", 7, 1, 2, 7),
        ("challenge", "query", -1, -1, -1, 0),
        ("challenge", "gallery", -1, -1, -1, 0), ("challenge", "gallery", -1, -1, -1, 12),
    ]
    assert p.entries[0].path == "images/reid_training/3_1_0.jpeg"
    assert p.entries[-1].src == "data_reid/reid_challenge/gallery/00012.jpeg"
    assert p.extras == {"numbers.csv": "numbers.csv"}
    assert p.notes == []


def test_official_root_below_a_wrapper_folder_or_at_data_reid_itself():
    wrapped = plan(["top/" + x for x in OFFICIAL], "official", "src.zip")
    assert wrapped.root == "top/data_reid/" and wrapped.extras == {"numbers.csv": "top/numbers.csv"}
    bare = plan([x[len("data_reid/"):] for x in OFFICIAL if x.startswith("data_reid/")], "auto", "data_reid")
    assert bare.layout == "official" and bare.root == "" and bare.extras == {}
    assert len(bare.entries) == len(wrapped.entries) == 10


def test_official_bad_training_name_names_the_file():
    with pytest.raises(SubmitError, match=r"src.zip: data_reid/reid_training/player3\.jpeg: expected a name like"):
        plan(OFFICIAL + ["data_reid/reid_training/player3.jpeg"], "auto", "src.zip")


def test_official_bad_challenge_name_names_the_file():
    with pytest.raises(SubmitError, match=r"reid_challenge/query/3_1_0\.jpeg: expected a challenge name"):
        plan(OFFICIAL + ["data_reid/reid_challenge/query/3_1_0.jpeg"], "auto", "src.zip")


def test_official_duplicate_challenge_number_is_refused():
    with pytest.raises(SubmitError, match=r"same challenge id 12"):
        plan(OFFICIAL + ["data_reid/reid_challenge/gallery/12.jpeg"], "auto", "src.zip")


@pytest.mark.parametrize("folder", ["reid_training", "reid_test/query", "reid_test/gallery",
                                    "reid_challenge/query", "reid_challenge/gallery"])
def test_official_missing_split_folder(folder):
    paths = [x for x in OFFICIAL if f"/{folder}/" not in x]
    with pytest.raises(SubmitError, match=f"src.zip: missing data_reid/{folder}/"):
        plan(paths, "auto", "src.zip")


def test_official_notes_unmatched_queries_and_shared_identities():
    p = plan(OFFICIAL + ["data_reid/reid_test/query/9_1_0.jpeg", "data_reid/reid_test/gallery/3_5_1.jpeg"],
             "official", "s")
    assert p.notes == ["1 test query identities have no gallery image (skipped when scoring)",
                       "1 identities appear in both train and test"]


MARKET = [
    "Market-1501-v15.09.15/bounding_box_train/0002_c1s1_000451_03.jpg",
    "Market-1501-v15.09.15/bounding_box_train/0002_c2s1_000301_01.jpg",
    "Market-1501-v15.09.15/bounding_box_train/Thumbs.db",
    "Market-1501-v15.09.15/query/0001_c1s1_001051_00.jpg",
    "Market-1501-v15.09.15/query/0001_c3s1_000551_00.jpg",
    "Market-1501-v15.09.15/bounding_box_test/-1_c1s1_000401_03.jpg",
    "Market-1501-v15.09.15/bounding_box_test/0000_c1s1_000151_01.jpg",
    "Market-1501-v15.09.15/bounding_box_test/0001_c1s1_001051_03.jpg",
    "Market-1501-v15.09.15/gt_bbox/0001_c1s1_001051_00.jpg",
]


def test_market_junk_dropped_distractors_kept_camera_as_seq():
    p = plan(MARKET, "auto", "m.zip")
    assert p.layout == "market" and p.root == "Market-1501-v15.09.15/"
    assert rows(p) == [
        ("train", "train", 2, 1, 451, 0), ("train", "train", 2, 2, 301, 1),
        ("test", "query", 1, 1, 1051, 1), ("test", "query", 1, 3, 551, 1),
        ("test", "gallery", -1, 1, 401, -1), ("test", "gallery", 1, 1, 1051, 1),
    ]
    assert p.entries[2].path == "images/query/0001_c1s1_001051_00.jpg"
    assert p.notes == ["dropped 1 junk image(s) (pid 0000)"]


def test_market_distractor_outside_gallery_is_dropped_and_duke_names_parse():
    paths = ["bounding_box_train/0005_c2_f0046182.jpg", "query/-1_c1s1_000401_03.jpg",
             "query/0005_c1_f0000001.jpg", "bounding_box_test/0005_c3_f0000002.jpg"]
    p = plan(paths, "market", "duke")
    assert rows(p) == [("train", "train", 5, 2, 46182, 0), ("test", "query", 5, 1, 1, 5),
                       ("test", "gallery", 5, 3, 2, 5)]
    assert "dropped 1 distractor image(s) (pid -1) outside the gallery" in p.notes


def test_market_bad_name_and_missing_folder():
    with pytest.raises(SubmitError, match=r"m: Market-1501-v15.09.15/query/person1\.jpg: expected a Market-1501 name"):
        plan(MARKET + ["Market-1501-v15.09.15/query/person1.jpg"], "market", "m")
    with pytest.raises(SubmitError, match=r"m: missing Market-1501-v15.09.15/query/ \(expected Market-1501 test query"):
        plan([x for x in MARKET if "/query/" not in x], "market", "m")


def folder_paths(n_ids=10, per_id=3, names=None, wrapper="people/"):
    names = names or [str(100 + i) for i in range(n_ids)]
    return [f"{wrapper}{name}/img{k}.jpg" for name in names for k in range(per_id)]


def test_folders_seeded_split_one_query_per_test_identity():
    paths = folder_paths() + ["people/readme.txt"]
    p = plan(paths, "auto", "dir", Options(test_fraction=0.3, seed=3))
    assert p.layout == "folders" and p.root == "people/"
    test_ids = {e.pid for e in p.entries if e.split == "test"}
    train_ids = {e.pid for e in p.entries if e.split == "train"}
    assert len(test_ids) == 3 and len(train_ids) == 7 and not test_ids & train_ids
    queries = [e for e in p.entries if e.role == "query"]
    assert sorted(e.pid for e in queries) == sorted(test_ids)
    assert all(e.src.endswith("/img0.jpg") and e.image_id == e.pid for e in queries)
    assert sum(e.role == "gallery" for e in p.entries) == 6
    assert p.entries[0].path == "images/100/img0.jpg" and p.entries[0].pid == 100
    again = plan(paths, "folders", "dir", Options(test_fraction=0.3, seed=3))
    other = plan(paths, "folders", "dir", Options(test_fraction=0.3, seed=4))
    assert rows(again) == rows(p) and rows(other) != rows(p)


def test_folders_named_identities_are_numbered_and_singletons_stay_in_train():
    paths = folder_paths(names=["alice", "bob", "carol"], wrapper="") + ["dave/only.jpg"]
    p = plan(paths, "folders", "dir", Options(test_fraction=0.5, seed=0))
    pids = {e.src.split("/")[0]: e.pid for e in p.entries}
    assert pids == {"alice": 0, "bob": 1, "carol": 2, "dave": 3}
    assert all(e.split == "train" for e in p.entries if e.pid == 3)
    assert sum(e.role == "query" for e in p.entries) == 2


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_folders_bad_fraction(fraction):
    with pytest.raises(SubmitError, match=f"test fraction {fraction}: expected a number between 0 and 1"):
        plan(folder_paths(), "folders", "dir", Options(test_fraction=fraction))


def test_folders_structure_errors():
    with pytest.raises(SubmitError, match=r"dir: people/100/sub/x\.jpg: expected ROOT/\{identity\}/\{image\}"):
        plan(folder_paths() + ["people/100/sub/x.jpg"], "folders", "dir")
    with pytest.raises(SubmitError, match="found 1 identity folder"):
        plan(folder_paths(n_ids=1, wrapper=""), "folders", "dir")
    with pytest.raises(SubmitError, match="name the same pid twice"):
        plan(folder_paths(names=["7", "007", "8"]), "folders", "dir")
    with pytest.raises(SubmitError, match="cannot split 2 identities"):
        plan(folder_paths(n_ids=2, per_id=1), "folders", "dir")


def test_unrecognised_layout_and_unknown_layout_name():
    with pytest.raises(SubmitError, match=r"odd\.zip: unrecognised layout"):
        plan(["a.jpg", "b/c/d.jpg", "e/f.jpg"], "auto", "odd.zip")
    with pytest.raises(SubmitError, match="layout 'coco': expected one of"):
        plan(OFFICIAL, "coco", "x")


def test_layout_choices_come_from_the_registry():
    """`--layout` offers auto plus every name in `LAYOUTS`, nothing hand-listed."""
    from submit.cli import prepare
    from submit.layouts import LAYOUTS

    option = next(p for p in prepare.params if p.name == "layout")
    assert list(option.type.choices) == ["auto", *LAYOUTS] == ["auto", "official", "market", "folders"]
