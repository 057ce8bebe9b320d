"""Every bad data input a user can give: a one-line error naming the value (or a counted warning),
raised before any tokenizing where possible, and no partial output left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from train.data import DataConfig, DataError, DataPathNotFoundError, build_dataloader, get_tokenizer
from train.prepare import main as prepare_main

T = 16


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("gpt2")


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


def load(tmp_path, tok, path, split="train", **kw):
    cfg = DataConfig(source=kw.pop("source", "text"), path=str(path), cache_dir=str(tmp_path / "cache"), **kw)
    return build_dataloader(cfg, tok, split, T, 2)


def no_cache_entry(tmp_path) -> bool:
    d = tmp_path / "cache" / "tokens"
    return not d.exists() or not [p for p in d.iterdir() if p.is_dir()]


def test_missing_path(tmp_path, tok):
    with pytest.raises(DataPathNotFoundError) as e:
        load(tmp_path, tok, tmp_path / "nope.jsonl")
    assert "nope.jsonl" in one_line(e) and isinstance(e.value, FileNotFoundError)
    with pytest.raises(DataPathNotFoundError, match="matches no files"):
        load(tmp_path, tok, tmp_path / "*.jsonl")
    with pytest.raises(DataError, match="data.path is required"):
        build_dataloader(DataConfig(source="text"), tok, "train", T, 2)


def test_empty_file_and_no_documents(tmp_path, tok):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty") as e:
        load(tmp_path, tok, tmp_path / "empty.txt")
    one_line(e)
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "   "}) + "\n")
    with pytest.raises(DataError, match="no documents") as e:
        load(tmp_path, tok, tmp_path / "blank.jsonl")
    one_line(e)
    assert no_cache_entry(tmp_path)


def test_jsonl_without_text_field(tmp_path, tok):
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"content": "hello", "id": 1}) + "\n")
    with pytest.raises(DataError) as e:
        load(tmp_path, tok, f)
    msg = one_line(e)
    assert "'text'" in msg and "['content', 'id']" in msg and "x.jsonl:1" in msg
    assert no_cache_entry(tmp_path)  # checked before any tokenizing
    # a later record without the field fails during tokenizing, still one line, no cache entry left
    f.write_text(json.dumps({"text": "hello " * 50}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"x.jsonl:2: no field 'text'.*\['body'\]") as e:
        load(tmp_path, tok, f)
    one_line(e)
    assert no_cache_entry(tmp_path)
    f.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match="x.jsonl:2: invalid JSON"):
        load(tmp_path, tok, f)


def test_parquet_without_text_column(tmp_path, tok):
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"no column 'text'.*\['content'\]") as e:
        load(tmp_path, tok, tmp_path / "x.parquet")
    one_line(e)


def test_unsupported_file_type(tmp_path, tok):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"unsupported file type '.csv'.*allowed: .txt") as e:
        load(tmp_path, tok, tmp_path / "x.csv")
    one_line(e)


def test_invalid_utf8_is_skipped_and_counted(tmp_path, tok):
    good = [f"good line {i} " + "word " * 20 for i in range(20)]
    lines = [json.dumps({"text": t}).encode() for t in good]
    lines.insert(3, b'{"text": "bad \xff\xfe bytes"}')
    lines.insert(9, b'{"text": "more \xc3\x28 bad"}')
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.warns(UserWarning, match=r"skipped 2 line\(s\) with invalid UTF-8 in .*d.jsonl"):
        ld = load(tmp_path, tok, tmp_path / "d.jsonl", val_fraction=0.0)
    stream = [t for d in good for t in tok.encode(d) + [tok.eot_token]]
    assert ld.store.read(0, ld.store.n_tokens).tolist() == stream  # every good line, nothing else
    txt = tmp_path / "t" / "a.txt"
    txt.parent.mkdir()
    txt.write_bytes(b"first line ok\nsecond \xff line\nthird line ok " + b"w " * 40)
    with pytest.warns(UserWarning, match=r"skipped 1 line\(s\)"):
        ld = load(tmp_path, tok, txt, val_fraction=0.0)
    assert tok.decode(ld.store.read(0, ld.store.n_tokens).tolist()).startswith("first line ok\nthird line ok")


def test_all_lines_invalid_utf8(tmp_path, tok):
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "\xff"}\n{"text": "\xfe"}\n')
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no documents") as e:
        load(tmp_path, tok, tmp_path / "d.jsonl")
    msg = one_line(e)
    assert str(tmp_path / "d.jsonl") in msg and "2 line(s) skipped as invalid UTF-8" in msg
    assert no_cache_entry(tmp_path)
    # a latin-1 text file: every line undecodable; the error names the file and the count (each split
    # reads the file once, the count is still the file's own 50 lines, warned once)
    lat = tmp_path / "latin1.txt"
    lat.write_bytes("Sh\u00e4kespeare \u00e9crit\n".encode("latin-1") * 50)
    with pytest.warns(UserWarning) as caught, pytest.raises(DataError) as e:
        load(tmp_path, tok, lat)
    msg = one_line(e)
    assert f"(1 file(s): {lat})" in msg and "50 line(s) skipped as invalid UTF-8" in msg, msg
    assert [str(w.message) for w in caught] == [f"skipped 50 line(s) with invalid UTF-8 in {lat}"]
    # several files: each one with skipped lines is named with its count
    (tmp_path / "many").mkdir()
    for name, n in (("a.txt", 3), ("b.txt", 0), ("c.jsonl", 2)):
        f = tmp_path / "many" / name
        f.write_bytes(b'{"text": "\xe9"}\n' * n if name.endswith("jsonl") else b"\xe9t\xe9\n" * n + b" \n")
    with pytest.warns(UserWarning), pytest.raises(DataError) as e:
        load(tmp_path, tok, tmp_path / "many")
    msg = one_line(e)
    assert "(3 file(s): " in msg and "5 line(s) skipped as invalid UTF-8" in msg, msg
    assert f"3 in {tmp_path / 'many' / 'a.txt'}, 2 in {tmp_path / 'many' / 'c.jsonl'}" in msg, msg


def test_empty_corpus_names_files(tmp_path, tok):
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(DataError) as e:
        load(tmp_path, tok, tmp_path / "blank.txt")
    msg = one_line(e)
    assert f"(1 file(s): {tmp_path / 'blank.txt'})" in msg and "empty or whitespace" in msg, msg
    assert "UTF-8" not in msg


def test_corpus_smaller_than_one_window(tmp_path, tok):
    (tmp_path / "a.txt").write_text("Too short.")
    with pytest.raises(DataError) as e:
        build_dataloader(DataConfig(source="text", path=str(tmp_path / "a.txt"), cache_dir=str(tmp_path / "c"),
                                    val_fraction=0.0), tok, "train", 64, 2, 2, 0, 2)
    msg = one_line(e)
    assert "4 tokens" in msg and "needs 8 windows (513 tokens)" in msg  # 3 tokens + EOT vs 8*64+1
    (tmp_path / "b.txt").write_text("one two three " * 100)
    with pytest.raises(DataError, match=r"the val split of the text corpus \(1 file\(s\): .*b.txt\) has \d+ tokens = "
                       r"0 windows of seq_len 64"):
        build_dataloader(DataConfig(source="text", path=str(tmp_path / "b.txt"), cache_dir=str(tmp_path / "c"),
                                    val_fraction=0.01), tok, "val", 64, 2)
    with pytest.raises(DataError, match="val_fraction is 0"):
        build_dataloader(DataConfig(source="text", path=str(tmp_path / "b.txt"), cache_dir=str(tmp_path / "c"),
                                    val_fraction=0.0), tok, "val", 64, 2)


@pytest.fixture()
def tokens_dir(tmp_path) -> Path:
    (tmp_path / "a.txt").write_text(" ".join(f"w{i}" for i in range(400)))
    out = tmp_path / "tok"
    assert prepare_main(["--source", "text", "--path", str(tmp_path / "a.txt"), "--out", str(out),
                         "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("damage,match", [
    ("rm_index", "has no index.json"),
    ("garbage", "not valid JSON"),
    ("format", "not an lmforge-tokens header"),
    ("dtype", "dtype 'float32', allowed: uint16, uint32"),
    ("version", "header version 99"),
    ("rm_shard", "shard train_000000.bin is missing"),
    ("truncate", "shard train_000000.bin has 10 bytes"),
    ("tokenizer", "was tokenized with 'gpt2'"),
])
def test_bad_tokens_dir(tokens_dir, tok, damage, match):
    idx = tokens_dir / "index.json"
    h = json.loads(idx.read_text())
    if damage == "rm_index":
        idx.unlink()
    elif damage == "garbage":
        idx.write_bytes(b"\x00garbage{")
    elif damage in ("format", "dtype", "version"):
        h[damage] = {"format": "npy", "dtype": "float32", "version": 99}[damage]
        idx.write_text(json.dumps(h))
    elif damage == "rm_shard":
        (tokens_dir / "train_000000.bin").unlink()
    elif damage == "truncate":
        (tokens_dir / "train_000000.bin").write_bytes(b"0123456789")
    elif damage == "tokenizer":
        h["tokenizer_fingerprint"] = "0" * 16
        idx.write_text(json.dumps(h))
    with pytest.raises(DataError, match=match) as e:
        build_dataloader(DataConfig(source="tokens", path=str(tokens_dir)), tok, "train", T, 2)
    one_line(e)


def test_missing_tokens_dir(tmp_path, tok):
    with pytest.raises(DataPathNotFoundError, match="train.prepare") as e:
        build_dataloader(DataConfig(source="tokens", path=str(tmp_path / "none")), tok, "train", T, 2)
    one_line(e)


@pytest.mark.parametrize("kw,match", [
    ({"micro_batch_size": 0}, "micro_batch_size must be an integer >= 1, got 0"),
    ({"seq_len": 0}, "seq_len must be an integer >= 1, got 0"),
    ({"grad_accum": 0}, "grad_accum must be an integer >= 1, got 0"),
    ({"dp_rank": 2, "dp_size": 2}, r"dp_rank must be in \[0, 2\), got 2"),
    ({"split": "test"}, "split must be 'train' or 'val', got 'test'"),
    ({"cfg": {"source": "s3"}}, "unknown data.source 's3'; allowed: shakespeare, text, hf, tokens"),
    ({"cfg": {"val_fraction": 1.0}}, r"data.val_fraction must be in \[0, 1\), got 1.0"),
    ({"cfg": {"num_workers": -1}}, "data.num_workers must be an integer >= 0, got -1"),
])
def test_bad_arguments(tmp_path, tok, kw, match):
    cfg = DataConfig(cache_dir=str(tmp_path), **kw.pop("cfg", {}))
    args = {"split": "train", "seq_len": T, "micro_batch_size": 2} | kw
    with pytest.raises(DataError, match=match) as e:
        build_dataloader(cfg, tok, **args)
    one_line(e)
    assert not (tmp_path / "tokens").exists()  # validated before tokenizing anything


def test_state_from_another_corpus_or_seq_len(tmp_path, tok):
    (tmp_path / "a.txt").write_text(" ".join(f"w{i}" for i in range(600)))
    cfg = DataConfig(source="text", path=str(tmp_path / "a.txt"), cache_dir=str(tmp_path / "c"))
    state = build_dataloader(cfg, tok, "train", T, 2).state_dict()
    with pytest.raises(DataError, match="seq_len 16.*seq_len 32") as e:
        build_dataloader(cfg, tok, "train", 32, 2).load_state_dict(state)
    one_line(e)
    with pytest.raises(DataError, match="not an indexed-source state"):
        build_dataloader(cfg, tok, "train", T, 2).load_state_dict({"kind": "hf"})


def test_hf_bad_inputs(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"content": f"doc {i}"}) + "\n" for i in range(5)))
    with pytest.raises(DataError, match=r"no field 'text' \(fields found: \['content'\]\)") as e:
        build_dataloader(DataConfig(source="hf", path=str(f), val_docs=1), tok, "train", T, 2)
    one_line(e)
    with pytest.raises(DataPathNotFoundError, match="does not exist"):
        build_dataloader(DataConfig(source="hf", path=str(tmp_path / "none.jsonl")), tok, "train", T, 2)
    with pytest.raises(DataError, match="needs data.name"):
        build_dataloader(DataConfig(source="hf"), tok, "train", T, 2)


def test_prepare_cli_bad_input_leaves_nothing(tmp_path, capsys):
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "hello"}) + "\n")
    out = tmp_path / "out"
    assert prepare_main(["--source", "text", "--path", str(tmp_path / "x.jsonl"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "'text'" in err
    assert not out.exists()
    assert prepare_main(["--source", "text", "--path", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err and not out.exists()
