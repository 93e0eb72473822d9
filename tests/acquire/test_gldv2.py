"""`glr fetch-gldv2` against a loopback mirror in GLDv2's layout (tests/fake_gldv2.py)."""
from __future__ import annotations

import json
import tarfile

import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline.acquire.competition import Competition, hashed_relpath
from pipeline.acquire.gldv2 import fetch_gldv2, parse_shards
from submissions.errors import UserError
from tests.fake_gldv2 import MirrorServer, add_shard, make_mirror


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def _fetch(srv, root, **kw):
    split = kw.get("split", "train")
    n = sum(1 for f in srv.mirror.files if f.startswith(f"{split}/images_"))
    kw.setdefault("shards", f"0-{n - 1}")  # the mirror's shards (the real one has 500 train tars)
    kw.setdefault("retries", 1)
    kw.setdefault("timeout", 5)
    return fetch_gldv2(root, mirror=srv.url, **kw)


def test_complete_fetch_is_byte_identical_and_rerun_downloads_nothing(tmp_path):
    m = make_mirror()
    with MirrorServer(m) as srv:
        res = _fetch(srv, tmp_path / "d", split="train", workers=2)
        assert (res["fetched"], res["failed"], res["images_extracted"]) == (2, 0, 12)
        for i, data in m.images["train"].items():
            assert (tmp_path / "d" / "train" / hashed_relpath(i)).read_bytes() == data
        assert not list((tmp_path / "d" / ".glr-gldv2" / "train").glob("*.tar*"))  # tars deleted after extraction
        n = len(srv.log)
        again = _fetch(srv, tmp_path / "d", split="train", workers=2)
        assert (again["fetched"], again["skipped"], again["downloaded_bytes"]) == (0, 2, 0)
        assert len(srv.log) == n  # not a single request: metadata and shards are on disk
    comp = Competition(tmp_path / "d")
    assert sorted(comp.train["id"]) == sorted(m.images["train"])
    assert dict(zip(comp.train["id"], comp.train["landmark_id"])) == m.labels
    assert list(comp.train.columns) == ["id", "landmark_id"]


def test_cut_mid_tar_resumes_with_a_range_for_exactly_the_missing_bytes(tmp_path):
    m = make_mirror(train_shards=1, per_shard=20)
    path = "train/images_000.tar"
    size = len(m.files[path])
    with MirrorServer(m) as srv:
        srv.cut_once.add(path)
        res = _fetch(srv, tmp_path, split="train", shards="0")
        gets = srv.gets(path)
    assert res["failed"] == 0 and res["fetched"] == 1
    assert len(gets) == 2
    first, second = gets
    assert first[2] is None and 0 < first[3] < size
    assert second[2] == f"bytes={first[3]}-"  # asks from exactly where the cut left it
    assert first[3] + second[3] == size  # nothing downloaded twice
    for i, data in m.images["train"].items():
        assert (tmp_path / "train" / hashed_relpath(i)).read_bytes() == data


def test_md5_mismatch_is_downloaded_again_then_listed_in_failed_csv(tmp_path):
    m = make_mirror(train_shards=3, per_shard=3)
    with MirrorServer(m) as srv:
        srv.corrupt["train/images_000.tar"] = 1  # wrong once: the second download is right
        srv.corrupt["train/images_001.tar"] = 99  # always wrong
        res = _fetch(srv, tmp_path, split="train", workers=3)
        assert len(srv.gets("train/images_000.tar")) == 2
        assert len(srv.gets("train/images_001.tar")) == 2
    assert (res["fetched"], res["failed"]) == (2, 1)
    failed = pd.read_csv(tmp_path / "train" / "failed.csv")
    assert list(failed.columns) == ["shard", "reason"] and failed["shard"].tolist() == ["images_001.tar"]
    assert failed["reason"][0].startswith("md5 mismatch after 2 downloads")
    assert not list((tmp_path / ".glr-gldv2" / "train").glob("images_001*"))  # no wrong bytes kept
    assert len(Competition(tmp_path).train) == 6  # the two good shards' images, all listed


def test_failure_exits_nonzero_with_one_line_and_json(tmp_path):
    from pipeline.cli import cli

    m = make_mirror(train_shards=2, per_shard=2)
    with MirrorServer(m) as srv:
        srv.corrupt["train/images_001.tar"] = 99
        r = CliRunner().invoke(cli, ["fetch-gldv2", str(tmp_path), "--split", "train", "--shards", "0-1", "--mirror", srv.url,
                                     "--retries", "0", "--json", "--quiet"])
    assert r.exit_code != 0, r.output
    summary = json.loads(r.output[r.output.index("{"): r.output.rindex("}") + 1])
    assert (summary["fetched"], summary["failed"]) == (1, 1)
    assert isinstance(r.exception, UserError)  # main() prints it as one line, exit status 1
    assert "1 of 2 shard(s) failed" in str(r.exception) and "failed.csv" in str(r.exception)


def test_tar_with_dotdot_member_is_refused_and_nothing_written(tmp_path):
    m = make_mirror(train_shards=1, per_shard=2)
    evil = tarfile.TarInfo("../../escape.jpg")
    evil.size = 4
    add_shard(m, "train", 1, {"a/b/c/abcdef.jpg": b"jpeg"}, extra=[evil])
    with MirrorServer(m) as srv:
        res = _fetch(srv, tmp_path / "d", split="train", shards="0-1")
    assert (res["fetched"], res["failed"]) == (1, 1)
    assert "'..'" in (tmp_path / "d" / "train" / "failed.csv").read_text()
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path / "d" / "escape.jpg").exists()
    assert not (tmp_path / "d" / "train" / "a" / "b" / "c" / "abcdef.jpg").exists()


def test_tar_with_symlink_member_is_refused(tmp_path):
    m = make_mirror(train_shards=1, per_shard=1)
    link = tarfile.TarInfo("a/b/c/link.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    add_shard(m, "train", 0, {"a/b/c/abcdef.jpg": b"jpeg"}, extra=[link])
    with MirrorServer(m) as srv:
        res = _fetch(srv, tmp_path, split="train", shards="0")
    assert res["failed"] == 1
    assert "symbolic link" in (tmp_path / "train" / "failed.csv").read_text()


def test_resize_gives_longer_side(tmp_path):
    from PIL import Image

    m = make_mirror(train_shards=1, per_shard=4, w=160, h=120)
    with MirrorServer(m) as srv:
        _fetch(srv, tmp_path, split="train", resize=64)
    for i in m.images["train"]:
        with Image.open(tmp_path / "train" / hashed_relpath(i)) as img:
            assert max(img.size) == 64 and img.format == "JPEG"


def test_clean_only_keeps_train_clean_ids(tmp_path):
    m = make_mirror(train_shards=2, per_shard=4)
    with MirrorServer(m) as srv:
        _fetch(srv, tmp_path, split="train", clean_only=True)
    assert set(Competition(tmp_path).train["id"]) == m.clean
    for i in m.images["train"]:
        assert (tmp_path / "train" / hashed_relpath(i)).exists() == (i in m.clean)


def test_keep_tars(tmp_path):
    m = make_mirror(train_shards=1, per_shard=2)
    with MirrorServer(m) as srv:
        _fetch(srv, tmp_path, split="train", keep_tars=True)
    assert (tmp_path / ".glr-gldv2" / "train" / "images_000.tar").read_bytes() == m.files["train/images_000.tar"]


def test_built_folder_scores_a_perfect_submission_1_on_private_and_public(tmp_path):
    from pipeline.cli import cli
    from submissions.format import read_solution

    m = make_mirror(train_shards=1, per_shard=3, test_shards=2, test_per_shard=5)
    with MirrorServer(m) as srv:
        _fetch(srv, tmp_path, split="train")
        _fetch(srv, tmp_path, split="test")
    comp = Competition(tmp_path)
    assert sorted(comp.test_ids) == sorted(m.images["test"])
    for i, data in m.images["test"].items():
        assert comp.image_path(i, "test").read_bytes() == data
    assert comp.summary()["has_solution"]
    sol = read_solution(comp.solution_path)
    assert set(sol["usage"]) == {"Public", "Private", "Ignored"}
    sub = tmp_path / "perfect.csv"
    sub.write_text("id,landmarks\n" + "".join(
        f"{i},{f'{lm[0]} 1.0' if lm else ''}\n" for i, lm in zip(sol["id"], sol["landmarks"])))
    for usage in ("Private", "Public"):
        r = CliRunner().invoke(cli, ["gap", str(sub), str(comp.solution_path), "--usage", usage, "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["gap"] == 1.0


def test_parse_shards():
    assert parse_shards("0-49", "train") == list(range(50))
    assert parse_shards("3,0-1, 7", "train") == [0, 1, 3, 7]
    assert parse_shards(None, "test") == list(range(20))
    for bad, words in (("0-20", "0-19"), ("5-2", "backwards"), ("x", "not a shard number"), ("1-", "not a shard")):
        with pytest.raises(UserError, match=words):
            parse_shards(bad, "test")


def test_refuses_when_disk_is_short(tmp_path, monkeypatch):
    import pipeline.caches as caches

    m = make_mirror(train_shards=1, per_shard=2)
    monkeypatch.setattr(caches, "free_bytes", lambda p: 10)
    with MirrorServer(m) as srv, pytest.raises(UserError, match="disk has 10 B free"):
        _fetch(srv, tmp_path, split="train")
    assert not (tmp_path / "train").exists()


def test_bad_mirror_is_one_line(tmp_path):
    with MirrorServer(make_mirror(train_shards=1, per_shard=1)) as srv, pytest.raises(UserError, match="--mirror"):
        fetch_gldv2(tmp_path, mirror=srv.url + "/nothing-here", split="train", retries=0, timeout=2)


def test_resized_fraction_is_bounded():
    from pipeline.acquire.gldv2 import resized_fraction

    assert resized_fraction(0) == 1.0 and resized_fraction(2000) == 1.0
    assert 0 < resized_fraction(96) < resized_fraction(256) < 1.0


def test_cli_defaults_match_the_module_and_help_runs():
    from pipeline.acquire.gldv2 import DEFAULT_MIRROR
    from pipeline.cli import cli

    params = {p.name: p for p in cli.commands["fetch-gldv2"].params}
    assert params["mirror"].default == DEFAULT_MIRROR
    r = CliRunner().invoke(cli, ["fetch-gldv2", "--help"])
    assert r.exit_code == 0 and "--resize" in r.output and "--clean-only" in r.output


def test_missing_shard_is_a_failure_naming_its_url_while_others_finish(tmp_path):
    m = make_mirror(train_shards=2, per_shard=2)
    del m.files["train/images_001.tar"]
    with MirrorServer(m) as srv:
        res = _fetch(srv, tmp_path, split="train", shards="0-1", retries=0)
    assert (res["fetched"], res["failed"]) == (1, 1)
    reason = pd.read_csv(tmp_path / "train" / "failed.csv")["reason"][0]
    assert "train/images_001.tar: HTTP 404" in reason


def test_server_without_range_support_starts_the_file_over(tmp_path):
    m = make_mirror(train_shards=1, per_shard=10)
    path = "train/images_000.tar"
    with MirrorServer(m) as srv:
        srv.cut_once.add(path)
        srv.ignore_range = True
        res = _fetch(srv, tmp_path, split="train", shards="0")
        assert len(srv.gets(path)) == 2 and srv.gets(path)[1][3] == len(m.files[path])  # the whole file again
    assert res["failed"] == 0
    for i, data in m.images["train"].items():
        assert (tmp_path / "train" / hashed_relpath(i)).read_bytes() == data


def test_rerun_after_a_failure_fetches_only_the_failed_shard(tmp_path):
    m = make_mirror(train_shards=2, per_shard=2)
    with MirrorServer(m) as srv:
        srv.corrupt["train/images_001.tar"] = 2
        assert _fetch(srv, tmp_path, split="train")["failed"] == 1
        res = _fetch(srv, tmp_path, split="train")
        assert len(srv.gets("train/images_000.tar")) == 1
    assert (res["fetched"], res["skipped"], res["failed"]) == (1, 1, 0)
    assert not (tmp_path / "train" / "failed.csv").exists()
    assert len(Competition(tmp_path).train) == 4


def test_resize_drops_an_unreadable_member_and_leaves_it_out_of_train_csv(tmp_path):
    m = make_mirror(train_shards=1, per_shard=3)
    good = dict(list(m.images["train"].items()))
    members = {hashed_relpath(i): d for i, d in good.items()}
    members["f/f/f/fff0000000000000.jpg"] = b"<html>not a photo</html>"
    add_shard(m, "train", 0, members)
    m.files["metadata/train.csv"] += b"fff0000000000000,http://example.invalid/x.jpg,1\n"
    with MirrorServer(m) as srv:
        res = _fetch(srv, tmp_path, split="train", resize=32)
    assert res["failed"] == 0
    record = json.loads((tmp_path / ".glr-gldv2" / "train" / "images_000.done.json").read_text())
    assert record["dropped"] == 1 and record["extracted"] == 3
    assert set(Competition(tmp_path).train["id"]) == set(good)


def test_failed_csv_keeps_failures_of_shards_this_run_did_not_try(tmp_path):
    m = make_mirror(train_shards=3, per_shard=2)
    with MirrorServer(m) as srv:
        srv.corrupt["train/images_002.tar"] = 99
        _fetch(srv, tmp_path, split="train", shards="0,2")
        res = _fetch(srv, tmp_path, split="train", shards="1")  # shard 2 not retried: still listed
        assert (res["failed"], res["failed_earlier"]) == (0, 1)
        assert pd.read_csv(tmp_path / "train" / "failed.csv")["shard"].tolist() == ["images_002.tar"]
        srv.corrupt.clear()
        _fetch(srv, tmp_path, split="train", shards="2")
    assert not (tmp_path / "train" / "failed.csv").exists()


def test_a_slow_host_is_cut_at_the_deadline_and_resumed_without_counting_as_a_failure(tmp_path):
    import threading

    from pipeline.acquire.gldv2 import _download

    m = make_mirror(train_shards=1, per_shard=6)
    path = "train/images_000.tar"
    with MirrorServer(m) as srv:
        srv.trickle = 0.3  # a body takes ~1.2 s; each attempt may last 0.5 s
        part = tmp_path / "x.part"
        _download(f"{srv.url}/{path}", part, timeout=5, retries=0, stop=threading.Event(), deadline_s=0.5)
        ranges = [e[2] for e in srv.gets(path)]
    assert part.read_bytes() == m.files[path]
    assert len(ranges) >= 2 and ranges[0] is None and all(r.startswith("bytes=") for r in ranges[1:])


def test_announces_download_and_disk_before_starting(tmp_path, capsys):
    m = make_mirror(train_shards=2, per_shard=2)
    with MirrorServer(m) as srv:
        res = _fetch(srv, tmp_path, split="train")
        heads = [e for e in srv.log if e[0] == "HEAD"]
    err = capsys.readouterr().err
    assert "2 shard(s) to fetch" in err and "with --resize 256" in err
    assert len(heads) == 2
    assert res["download_bytes"] == len(m.files["train/images_000.tar"]) + len(m.files["train/images_001.tar"])
