"""`Competition`: every Kaggle layout opens, and every broken directory says what is wrong."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.acquire.competition import Competition, hashed_relpath, read_csv_checked
from submissions.errors import UserError


def write_jpeg(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


TRAIN_IDS = ["a1b2c3d4e5f60718", "0f1e2d3c4b5a6978", "00123abcdef45678"]
TEST_IDS = ["ffeeddccbbaa9988", "1234567890abcdef"]


# -- the layouts ---------------------------------------------------------------------------
def test_2021_layout_from_synth(synth_comp):
    comp = Competition(synth_comp)
    train = comp.train
    assert list(train.columns) == ["id", "landmark_id"]
    assert train["landmark_id"].dtype == np.int64
    first = train["id"].iloc[0]
    assert comp.image_path(first) == synth_comp / "train" / hashed_relpath(first)
    assert comp.image_path(first).exists()
    assert comp.ids("train") == train["id"].tolist()
    assert comp.ids("test") == comp.test_ids == comp.sample_submission["id"].tolist()
    assert comp.sample_submission["landmarks"].isna().all()
    assert comp.sample_submission_path == synth_comp / "sample_submission.csv"
    assert comp.solution_path == synth_comp / "solution.csv"
    assert comp.missing_images("train") == [] and comp.missing_images("test") == []
    assert [p.exists() for p in comp.image_paths(comp.test_ids[:3], "test")] == [True] * 3
    assert comp.summary() == {
        "root": str(synth_comp), "train_images": 48, "classes": 6, "test_images": 30, "has_solution": True,
    }


def test_2019_layout_with_url_columns_and_test_csv(tmp_path):
    """2018/2019: train.csv has a url column; test ids come from test.csv; images are fetched hashed."""
    write_text(tmp_path / "train.csv", "id,url,landmark_id\n" + "".join(
        f"{i},https://example.org/{i}.jpg,{lid}\n" for i, lid in zip(TRAIN_IDS, [7, 7, 123456])))
    write_text(tmp_path / "test.csv", "id,url\n" + "".join(f"{i},http://x/{i}.jpg\n" for i in TEST_IDS))
    comp = Competition(tmp_path)
    assert comp.sample_submission is None and comp.sample_submission_path is None and comp.solution_path is None
    assert comp.test_ids == TEST_IDS
    assert comp.train["url"].iloc[0] == f"https://example.org/{TRAIN_IDS[0]}.jpg"
    assert comp.train["landmark_id"].tolist() == [7, 7, 123456]
    assert comp.train["id"].iloc[2] == "00123abcdef45678"  # ids stay strings
    # before fetching: every image is missing, and the message says how to get them
    assert comp.missing_images("train") == TRAIN_IDS
    with pytest.raises(UserError, match=r"3 id\(s\) have no image file: .*glr fetch"):
        comp.check_images("train")
    for i in TRAIN_IDS:
        write_jpeg(tmp_path / "train" / hashed_relpath(i))
    for i in TEST_IDS:
        write_jpeg(tmp_path / "test" / hashed_relpath(i))
    comp = Competition(tmp_path)
    comp.check_images("train")
    comp.check_images("test")
    assert comp.image_path(TEST_IDS[0], "test") == tmp_path / "test" / "f" / "f" / "e" / f"{TEST_IDS[0]}.jpg"
    assert comp.summary()["classes"] == 2 and comp.summary()["test_images"] == 2


def test_flat_folders_and_test_ids_from_files(tmp_path):
    write_text(tmp_path / "train.csv", "id,landmark_id\n" + "".join(f"{i},{n}\n" for n, i in enumerate(TRAIN_IDS)))
    for i in TRAIN_IDS:
        write_jpeg(tmp_path / "train" / f"{i}.jpg")
    for i in TEST_IDS:
        write_jpeg(tmp_path / "test" / f"{i}.jpg")
    comp = Competition(tmp_path)
    assert comp.image_path(TRAIN_IDS[1]) == tmp_path / "train" / f"{TRAIN_IDS[1]}.jpg"
    assert comp.test_ids == sorted(TEST_IDS)  # no CSV: the files under test/ are the test set
    assert comp.image_path(TEST_IDS[0], "test") == tmp_path / "test" / f"{TEST_IDS[0]}.jpg"
    comp.check_images("train")
    comp.check_images("test")
    # an id whose file is missing is still found as missing in the flat layout
    (tmp_path / "train" / f"{TRAIN_IDS[2]}.jpg").unlink()
    assert Competition(tmp_path).missing_images("train") == [TRAIN_IDS[2]]


def test_check_images_lists_the_first_missing_and_counts_the_rest(tmp_path):
    ids = [f"{n:016x}" for n in range(8)]
    write_text(tmp_path / "train.csv", "id,landmark_id\n" + "".join(f"{i},1\n" for i in ids))
    write_jpeg(tmp_path / "train" / hashed_relpath(ids[0]))
    comp = Competition(tmp_path)
    with pytest.raises(UserError) as err:
        comp.check_images("train")
    msg = str(err.value)
    assert str(tmp_path / "train") in msg and "7 id(s) have no image file" in msg
    assert ", ".join(ids[1:6]) in msg and "(+2 more)" in msg and ids[7] not in msg
    assert "\n" not in msg


# -- broken directories ------------------------------------------------------------------------
def test_not_a_directory_and_missing_train_csv(tmp_path):
    with pytest.raises(UserError, match="not a directory.*glr synth"):
        Competition(tmp_path / "nowhere")
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError, match="no train.csv here"):
        Competition(tmp_path)


@pytest.mark.parametrize("text, message", [
    ("image,landmark\nabc,1\n", "missing column(s) id, landmark_id; found image, landmark"),
    ("id,landmark\nabc,1\n", "missing column(s) landmark_id; found id, landmark"),
    ("id,landmark_id\nabc,1\nabd,2\nabe,3\nabd,4\nabc,5\n", "row 5: duplicate id 'abd' (first on row 3; 2 duplicate"),
    ("id,landmark_id\nabc,1\nabd,two\n", "row 3: landmark_id 'two' is not an integer"),
    ("id,landmark_id\nabc,1\nabd,2.5\n", "row 3: landmark_id"),
    ("id,landmark_id\nabc,1\nabd,\n", "row 3: empty landmark_id"),
    ("id,landmark_id\nabc,1\n,2\n", "row 3: empty id"),
    ("", "file is empty"),
    # issue 15 class 6: a negative or wrapping class id, an id naming a path, a column given twice
    ("id,landmark_id\nabc,1\nabd,-1\n", "row 3: landmark_id -1 is not an integer from 0 to 2^63-1"),
    ("id,landmark_id\nabc,9223372036854775808\n", "row 2: landmark_id 9223372036854775808 is not an integer"),
    ("id,landmark_id\nabc,99999999999999999999999\n", "row 2: landmark_id 99999999999999999999999 is not"),
    ("id,landmark_id\nabc,1\n../../x,2\n", "row 3: id '../../x' is not a plain file name"),
    ("id,landmark_id\nabc,1\na\\b,2\n", "row 3: id 'a\\\\b' is not a plain file name"),
    ("id,landmark_id\n..,1\n", "row 2: id '..' is not a plain file name"),
    ("id,landmark_id,id\nabc,1,abd\n", "line 1: column 'id' appears more than once"),
    ("id,landmark_id,landmark_id\nabc,1,2\n", "line 1: column 'landmark_id' appears more than once"),
])
def test_bad_train_csv_names_file_row_and_column(tmp_path, text, message):
    write_text(tmp_path / "train.csv", text)
    with pytest.raises(UserError) as err:
        Competition(tmp_path).train
    assert str(tmp_path / "train.csv") in str(err.value)
    assert message in str(err.value)


def test_bad_sample_submission_and_test_csv(tmp_path):
    write_text(tmp_path / "train.csv", "id,landmark_id\nabc,1\n")
    write_text(tmp_path / "sample_submission.csv", "id,prediction\nx,\n")
    with pytest.raises(UserError, match=r"sample_submission.csv: missing column\(s\) landmarks"):
        Competition(tmp_path).test_ids
    (tmp_path / "sample_submission.csv").unlink()
    write_text(tmp_path / "test.csv", "id,url\nq1,u\nq2,u\nq1,u\n")
    with pytest.raises(UserError, match="test.csv: row 4: duplicate id 'q1' \\(first on row 2"):
        Competition(tmp_path).test_ids
    (tmp_path / "test.csv").unlink()
    with pytest.raises(UserError, match="cannot tell the test ids"):
        Competition(tmp_path).test_ids


def test_csv_that_is_a_directory_is_a_user_error(tmp_path):
    (tmp_path / "x.csv").mkdir()
    with pytest.raises(UserError, match="x.csv: is a directory"):
        read_csv_checked(tmp_path / "x.csv", ("id",))
    with pytest.raises(UserError, match="no such file"):
        read_csv_checked(tmp_path / "y.csv", ("id",))


def test_header_only_train_csv_and_image_ids_that_leave_the_folder(tmp_path):
    write_text(tmp_path / "train.csv", "id,landmark_id")  # no rows, no newline: an empty table, not Arrow jargon
    comp = Competition(tmp_path)
    assert comp.train.empty and comp.train["landmark_id"].dtype == "int64"
    assert comp.image_path("abc", "train") == tmp_path / "train" / "a" / "b" / "c" / "abc.jpg"
    for bad in ("../../x", "a/b", "..", "x\\y", "a\x00b"):  # ids from any table (predictions, inliers)
        with pytest.raises(UserError, match="is not a plain file name"):
            comp.image_path(bad, "test")


def test_unknown_split(synth_comp):
    comp = Competition(synth_comp)
    with pytest.raises(UserError, match="unknown split 'val'"):
        comp.ids("val")
    with pytest.raises(UserError, match="unknown split 'val'"):
        comp.image_path("abc", "val")


def test_ids_that_look_like_numbers_or_na_stay_strings(tmp_path):
    write_text(tmp_path / "train.csv", "id,landmark_id\n0001,1\nNA,2\n1e5,3\nnan,4\n")
    train = Competition(tmp_path).train
    assert train["id"].tolist() == ["0001", "NA", "1e5", "nan"]


def test_missing_images_of_a_synth_copy(synth_comp, tmp_path):
    """Removing one image from a real (synthetic) competition is caught, naming the id."""
    root = tmp_path / "c"
    shutil.copytree(synth_comp, root)
    comp = Competition(root)
    victim = comp.test_ids[4]
    comp.image_path(victim, "test").unlink()
    assert comp.missing_images("test") == [victim]
    with pytest.raises(UserError, match=f"1 id\\(s\\) have no image file: {victim} "):
        comp.check_images("test")
    comp.check_images("train")
    assert pd.read_csv(root / "solution.csv", dtype=str)["id"].tolist() == comp.test_ids
