"""Ranking-file writer (sorted, stable for repeated ids, atomic) and validating reader (one-line errors)."""

from __future__ import annotations

import numpy as np
import pytest

from submit.errors import SubmitError
from submit.ranking_file import id_mismatch, read_ranking, write_ranking


def test_round_trip_sorts_ids_stably_and_keeps_repeated_ids(tmp_path):
    dist = np.array([[0.5, 0.1, 0.2, 0.3],
                     [0.9, 0.8, 0.7, 0.6],
                     [0.123456, 0.0, 1.0, 2.5]])
    q_ids, g_ids = [30, 10, 20], [7, 3, 7, 5]  # gallery id 7 twice: columns 0 then 2 keep that order
    path = write_ranking(tmp_path / "out" / "ranking.csv", dist, q_ids, g_ids)
    text = path.read_text().splitlines()
    assert text[0] == "0,3,5,7,7"
    assert text[1] == "10,0.80000,0.60000,0.90000,0.70000"
    assert text[3] == "30,0.10000,0.30000,0.50000,0.20000"
    d, q, g = read_ranking(path)
    assert q.tolist() == [10, 20, 30] and g.tolist() == [3, 5, 7, 7]
    assert d[1].tolist() == [0.0, 2.5, 0.12346, 1.0]  # rounded to 5 decimals
    assert [p.name for p in path.parent.iterdir()] == ["ranking.csv"]  # no temp file left


def test_float_ids_print_as_integers(tmp_path):
    path = write_ranking(tmp_path / "r.csv", np.zeros((1, 2)), np.array([4.0]), np.array([2.0, 1.0]))
    assert path.read_text().splitlines() == ["0,1,2", "4,0.00000,0.00000"]


def test_official_padded_format_reads_the_same(tmp_path):
    ours = write_ranking(tmp_path / "ours.csv", np.array([[0.25, 1.5], [3.0, 0.0]]), [1, 2], [1, 1])
    padded = tmp_path / "official.csv"
    padded.write_text("0,1,1\n1,   0.25000,   1.50000\n2,   3.00000,   0.00000\n")
    a, b = read_ranking(ours), read_ranking(padded)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_writer_refuses_non_finite_and_keeps_the_old_file(tmp_path, bad):
    path = tmp_path / "r.csv"
    path.write_text("old")
    dist = np.zeros((2, 3))
    dist[1, 2] = bad
    with pytest.raises(SubmitError, match=r"r\.csv: distance (nan|inf) for query id 9 \(row 1\), gallery column 2"):
        write_ranking(path, dist, [8, 9], [1, 2, 3])
    assert path.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_writer_refuses_bad_ids_and_shapes(tmp_path):
    with pytest.raises(SubmitError, match=r"query id 1\.5 at position 1 is not an integer"):
        write_ranking(tmp_path / "r.csv", np.zeros((2, 1)), [1, 1.5], [1])
    with pytest.raises(SubmitError, match=r"shape \(2, 3\); expected \(2, 2\)"):
        write_ranking(tmp_path / "r.csv", np.zeros((2, 3)), [1, 2], [1, 2])
    with pytest.raises(SubmitError, match="gallery ids must be integers"):
        write_ranking(tmp_path / "r.csv", np.zeros((1, 1)), [1], ["a"])
    assert not list(tmp_path.iterdir())


def test_expected_ids_are_compared_as_multisets(tmp_path):
    path = write_ranking(tmp_path / "r.csv", np.zeros((2, 3)), [2, 1], [5, 5, 6])
    d, q, g = read_ranking(path, expect_queries=[1, 2], expect_gallery=[6, 5, 5])
    assert g.tolist() == [5, 5, 6]
    with pytest.raises(SubmitError, match=r"r\.csv: gallery ids differ .* 1 missing \(e\.g\. 6\), "
                                          r"1 not expected \(e\.g\. 5\)"):
        read_ranking(path, expect_gallery=[5, 6, 6])
    with pytest.raises(SubmitError, match=r"query ids differ .*\(2 in the file, 3 expected\): 1 missing \(e\.g\. 3\)"):
        read_ranking(path, expect_queries=[1, 2, 3])
    assert id_mismatch("query", [1, 1], [1, 1]) is None


BAD_FILES = [
    ("", r"empty file"),
    ("\n\n", r"empty file"),
    ("1,5,6\n1,0.1,0.2\n", r"line 1, column 1 is '1'; the header must start with 0"),
    ("0\n1\n", r"line 1 has no gallery ids"),
    ("0,5,x\n1,0.1,0.2\n", r"line 1, column 3: gallery id 'x' is not an integer"),
    ("0,5,6.5\n1,0.1,0.2\n", r"line 1, column 3: gallery id '6.5' is not an integer"),
    ("0,5,6\n", r"no query lines after the header"),
    ("0,5,6\n1,0.1,0.2\n2,0.3\n", r"line 3 has 2 fields; expected 3 like the header"),
    ("0,5,6\n1,0.1,0.2,0.4\n", r"line 2 has 4 fields; expected 3"),
    ("0,5,6\n1,0.1,0.2\n\n2,0.1,0.2\n", r"line 3 has 1 fields; expected 3"),
    ("0,5,6\nq1,0.1,0.2\n", r"line 2, column 1: query id 'q1' is not an integer"),
    ("0,5,6\n1,0.1,0.2\n2,0.1,abc\n", r"line 3, column 3: distance 'abc' is not a number"),
    ("0,5,6\n1,0.1,nan\n", r"line 2, column 3: distance 'nan' is not a finite number"),
    ("0,5,6\n1,inf,0.2\n", r"line 2, column 2: distance 'inf' is not a finite number"),
    ("0,5,6\n1,0.1,\n", r"line 2, column 3: distance '' is not a finite number"),
    ("0,6,5\n1,0.1,0.2\n", r"line 1, column 3: gallery id 5 comes after 6; gallery ids must be in ascending order"),
    ("0,5,6\n2,0.1,0.2\n1,0.1,0.2\n", r"line 3, column 1: query id 1 comes after 2; query ids must be"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_reader_names_file_line_and_column(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(SubmitError, match=message) as err:
        read_ranking(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_reader_missing_and_binary_files(tmp_path):
    with pytest.raises(SubmitError, match=r"nope\.csv: no such ranking file"):
        read_ranking(tmp_path / "nope.csv")
    path = tmp_path / "bin.csv"
    path.write_bytes(b"0,1\n\xff\xfe,0.1\n")
    with pytest.raises(SubmitError, match=r"bin\.csv: not a text CSV file"):
        read_ranking(path)


def test_windows_line_endings_and_trailing_blank_lines(tmp_path):
    path = tmp_path / "crlf.csv"
    path.write_bytes(b"0,5,6\r\n1,0.1,0.2\r\n\r\n")
    d, q, g = read_ranking(path)
    assert d.tolist() == [[0.1, 0.2]] and q.tolist() == [1] and g.tolist() == [5, 6]
