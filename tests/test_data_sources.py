"""Sources: local .txt/.jsonl/.parquet files, the hf stream (via `datasets` on local files), the
on-the-fly cache location and the resumable `train.prepare`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from train.data import DataConfig, DataError, build_dataloader, get_tokenizer
from train.data.shards import TokenStore
from train.prepare import main as prepare_main

T = 16


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("gpt2")


def texts(n: int, tag: str = "d") -> list[str]:
    return [f"{tag}{i} says " + " ".join(str(97 * i + j) for j in range(4 + i % 9)) + "." for i in range(n)]


def stream_of(tok, docs: list[str]) -> list[int]:
    return [t for d in docs for t in tok.encode(d) + [tok.eot_token]]


def test_mixed_dir_token_stream(tmp_path, tok):
    a, b, c = texts(8, "a"), texts(8, "b"), texts(8, "c")
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("\n".join(a))  # one document per .txt file
    with open(d / "sub" / "b.jsonl", "w") as f:
        f.writelines(json.dumps({"body": t, "n": 1}) + "\n" for t in b)
    pq.write_table(pa.table({"body": c, "n": list(range(8))}), d / "c.parquet")
    (d / "notes.csv").write_text("ignored: not a corpus file type\n")
    cfg = DataConfig(source="text", path=str(d), text_field="body", val_fraction=0.25, cache_dir=str(tmp_path / "c"))
    ld = build_dataloader(cfg, tok, "train", T, 1)
    docs = ["\n".join(a)] + c + b  # sorted paths: a.txt, c.parquet, sub/b.jsonl
    train = [x for i, x in enumerate(docs) if (i + 1) // 4 == i // 4]  # every 4th document held out
    val = [x for i, x in enumerate(docs) if (i + 1) // 4 != i // 4]
    assert ld.store.read(0, ld.store.n_tokens).tolist() == stream_of(tok, train)
    vl = build_dataloader(cfg, tok, "val", T, 1)
    assert vl.store.read(0, vl.store.n_tokens).tolist() == stream_of(tok, val)


def test_glob_and_single_text_file_tail_split(tmp_path, tok):
    body = "\n".join(f"Line {i} of the only document." for i in range(200))
    (tmp_path / "one.txt").write_text(body)
    (tmp_path / "skip.md").write_text("not matched by the glob")
    cfg = DataConfig(source="text", path=str(tmp_path / "*.txt"), val_fraction=0.1, cache_dir=str(tmp_path / "c"))
    tr = build_dataloader(cfg, tok, "train", T, 1).store
    va = build_dataloader(cfg, tok, "val", T, 1).store
    cut = body.index("\n", int(len(body) * 0.9)) + 1  # one document: its last 10% from a line start
    assert tr.read(0, tr.n_tokens).tolist() == stream_of(tok, [body[:cut]])
    assert va.read(0, va.n_tokens).tolist() == stream_of(tok, [body[cut:]])


def test_cache_location_from_env(tmp_path, tok, monkeypatch):
    (tmp_path / "a.txt").write_text(" ".join(str(i) for i in range(300)))
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "envcache"))
    ld = build_dataloader(DataConfig(source="text", path=str(tmp_path / "a.txt")), tok, "train", T, 1)
    assert Path(ld.store.root).parent == tmp_path / "envcache" / "tokens"
    # the key follows the content: an edit makes a new entry instead of reusing stale tokens
    (tmp_path / "a.txt").write_text(" ".join(str(i) for i in range(301)))
    ld2 = build_dataloader(DataConfig(source="text", path=str(tmp_path / "a.txt")), tok, "train", T, 1)
    assert ld2.store.root != ld.store.root and ld2.store.n_tokens > ld.store.n_tokens


def _packed(tok, docs, B):
    """Oracle: (x rows) micro-batches of one (rank, worker) share."""
    s = stream_of(tok, docs)
    wins = [s[i * T:i * T + T + 1] for i in range((len(s) - 1) // T)]
    return [torch.tensor(wins[k:k + B])[:, :-1] for k in range(0, len(wins) - B + 1, B)]


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    docs = texts(120, "h")
    with open(d / "train.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t, "meta": i}) + "\n" for i, t in enumerate(docs))
    pq.write_table(pa.table({"text": docs}), d / "train.parquet")
    return d, docs


def _windows(tok, docs):
    s = stream_of(tok, docs)
    return [s[i * T:i * T + T + 1] for i in range((len(s) - 1) // T)]


def _global_rows(tok, docs, V, G, n_steps):
    """Oracle: x rows of n_steps global batches of a single-file stream cut into V shards (shard v = every
    V-th record from record v): step k = the next G / V windows of shard 0, then of shard 1, ..."""
    c = G // V
    wins = [_windows(tok, docs[v::V]) for v in range(V)]
    return [torch.tensor([wins[v][k * c + j] for v in range(V) for j in range(c)])[:, :-1] for k in range(n_steps)]


@pytest.mark.parametrize("fname", ["train.jsonl", "train.parquet"])
def test_hf_stream_from_local_files(hf_files, tok, fname):
    d, docs = hf_files
    cfg = DataConfig(source="hf", path=str(d / fname), val_docs=10, shuffle=False)
    one = build_dataloader(cfg, tok, "train", T, 2)
    assert one.n_shards == 2  # auto: the largest divisor of the global batch (2) up to 32
    expect = _global_rows(tok, docs[10:], 2, 2, 20)
    got = [x for _, (x, _) in zip(range(20), one)]
    assert all(torch.equal(a, b) for a, b in zip(got, expect)) and len(got) == 20
    val = build_dataloader(cfg, tok, "val", T, 2)
    assert torch.equal(next(iter(val))[0], _packed(tok, docs[:10], 2)[0])  # the first val_docs documents
    # 2 ranks x 2: global batch 4 = 4 shards; rank r holds rows [2r, 2r+2) of every step
    expect = _global_rows(tok, docs[10:], 4, 4, 5)
    for r in range(2):
        ld = build_dataloader(cfg, tok, "train", T, 2, 1, r, 2)
        got = [x for _, (x, _) in zip(range(len(expect)), ld)]
        assert len(got) == len(expect) and all(torch.equal(x, e[2 * r:2 * r + 2]) for x, e in zip(got, expect))


def test_hf_workers_and_resume(hf_files, tok, monkeypatch):
    """Workers split the shards; the stream is that of 0 workers, and a state resumes with any worker count."""
    from train.data import hf

    monkeypatch.setattr(hf, "_READ_BATCH", 1)  # a dataset state after every record: this stream is short
    d, docs = hf_files
    cfg = DataConfig(source="hf", path=str(d / "train.jsonl"), val_docs=10, shuffle=False, num_workers=2)
    ld = build_dataloader(cfg, tok, "train", T, 2, 2)  # B 2 x A 2: 4 shards, 2 per worker
    expect = [e[k:k + 2] for e in _global_rows(tok, docs[10:], 4, 4, 6) for k in (0, 2)]
    it = iter(ld)
    got = [next(it)[0] for _ in range(7)]  # 3.5 steps: the state is at the step boundary + 1 micro-batch
    state = ld.state_dict()
    assert state["steps"] == 3 and state["micro_in_step"] == 1
    # unshuffled: each position carries the dataset's own state_dict() (at a read-batch boundary)
    assert all("ds_state" in p and p["ds_records"] <= p["records"] for p in state["positions"])
    got += [next(it)[0] for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(got, expect)) and len(got) == 12
    again = build_dataloader(DataConfig(**{**cfg.__dict__, "num_workers": 0}), tok, "train", T, 2, 2)
    again.load_state_dict(state)
    it2 = iter(again)
    assert all(torch.equal(next(it2)[0], e) for e in expect[7:])
    # on past the shards' first epoch (about 22 steps): the epoch after the jump reads its shard from the start
    straight = iter(build_dataloader(DataConfig(**{**cfg.__dict__, "num_workers": 0}), tok, "train", T, 2, 2))
    ref = [next(straight)[0] for _ in range(100)]
    assert all(torch.equal(next(it2)[0], e) for e in ref[12:])
    assert min(p["epoch"] for p in again.state_dict()["positions"]) >= 1


def test_hf_shuffle_is_seeded(hf_files, tok):
    d, _ = hf_files
    cfg = DataConfig(source="hf", path=str(d / "train.jsonl"), val_docs=10, shuffle=True)
    first = [[x for _, (x, _) in zip(range(3), build_dataloader(cfg, tok, "train", T, 2, seed=s))] for s in (1, 1, 2)]
    assert [len(f) for f in first] == [3, 3, 3]
    assert all(torch.equal(a, b) for a, b in zip(first[0], first[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first[0], first[2], strict=True))


def test_prepare_resumes_after_interruption(tmp_path, tok):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(200)))
    out = tmp_path / "out"
    args = ["--source", "text", "--path", str(corpus), "--out", str(out), "--shard-tokens", "300", "--no-progress"]
    assert prepare_main(args) == 0
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    shards = sorted(p for p in out.glob("train_*.bin"))
    assert len(shards) >= 6
    # simulate a crash after shard 2: no index, later shards gone, a temporary file left over
    (out / "index.json").unlink()
    for p in shards[3:]:
        p.unlink()
        p.with_suffix(".json").unlink()
    for p in out.glob("val_*"):
        p.unlink()
    (out / "train_000003.bin.tmp123").write_bytes(b"partial")
    kept = {p: p.stat().st_mtime_ns for p in shards[:3]}
    assert prepare_main(args) == 0
    assert all(p.stat().st_mtime_ns == m for p, m in kept.items())  # completed shards are not redone
    again = {p.name: p.read_bytes() for p in out.iterdir() if ".tmp" not in p.name}
    assert again == files  # byte-identical to the uninterrupted run
    # a finished dir is left alone; another corpus into it is refused
    assert prepare_main(args) == 0
    corpus.write_text(json.dumps({"text": "different"}) + "\n")
    assert prepare_main(args) == 2


def test_prepare_hf_source(hf_files, tmp_path, tok):
    d, docs = hf_files
    out = tmp_path / "hfout"
    assert prepare_main(["--source", "hf", "--path", str(d / "train.jsonl"), "--val-docs", "20", "--max-docs", "50",
                         "--out", str(out), "--no-progress"]) == 0
    tr, va = TokenStore(out, "train", tok), TokenStore(out, "val", tok)
    assert tr.read(0, tr.n_tokens).tolist() == stream_of(tok, docs[20:70])
    assert va.read(0, va.n_tokens).tolist() == stream_of(tok, docs[:20])
    assert os.path.getsize(out / "train_000000.bin") == 2 * tr.n_tokens  # uint16


def test_hf_saved_dataset_dir(tmp_path, tok):
    import datasets

    docs = texts(40, "s")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[8:]}),
                          "validation": datasets.Dataset.from_dict({"text": docs[:8]})}).save_to_disk(tmp_path / "ds")
    cfg = DataConfig(source="hf", path=str(tmp_path / "ds"), val_split="validation", shuffle=False)
    got = [x for _, (x, _) in zip(range(3), build_dataloader(cfg, tok, "train", T, 1))]  # one shard
    assert all(torch.equal(a, b) for a, b in zip(got, _packed(tok, docs[8:], 1)[:3])) and len(got) == 3
    assert torch.equal(next(iter(build_dataloader(cfg, tok, "val", T, 2)))[0], _packed(tok, docs[:8], 2)[0])
    with pytest.raises(DataError, match=r"no split 'test' \(splits: \['train', 'validation'\]\)"):
        build_dataloader(DataConfig(**{**cfg.__dict__, "val_split": "test"}), tok, "val", T, 2)


def test_long_document_tokenized_in_pieces(tmp_path, tok, monkeypatch):
    from train.data import shards

    monkeypatch.setattr(shards, "_PIECE_CHARS", 100)  # force the long-document path on a small file
    body = "\n".join(f"Line {i} speaks of thing{i}\n\n  and more" for i in range(120))
    (tmp_path / "a.txt").write_text(body)
    (tmp_path / "b.txt").write_text("short second document")
    cfg = DataConfig(source="text", path=str(tmp_path / "*.txt"), val_fraction=0.0, cache_dir=str(tmp_path / "c"))
    store = build_dataloader(cfg, tok, "train", T, 1).store
    assert store.read(0, store.n_tokens).tolist() == stream_of(tok, [body, "short second document"])
    assert len(shards.split_for_tokenizing(body, 100)) > 20


def test_hf_resume_shuffled_across_epochs(hf_files, tok):
    d, _ = hf_files
    cfg = DataConfig(source="hf", path=str(d / "train.jsonl"), val_docs=10, shuffle=True)
    ld = build_dataloader(cfg, tok, "train", T, 2, seed=7)
    it = iter(ld)
    straight = [next(it)[0] for _ in range(90)]  # ~70 micro-batches per epoch of this stream
    ld2 = build_dataloader(cfg, tok, "train", T, 2, seed=7)
    it2 = iter(ld2)
    head = [next(it2)[0] for _ in range(80)]
    state = ld2.state_dict()
    assert any(p["epoch"] == 1 for p in state["positions"]) and all(p["offset"] >= 0 for p in state["positions"])
    again = build_dataloader(cfg, tok, "train", T, 2, seed=7)
    again.load_state_dict(json.loads(json.dumps(state)))  # the state is plain JSON-able data
    it3 = iter(again)
    tail = [next(it3)[0] for _ in range(10)]
    assert all(torch.equal(a, b) for a, b in zip(head + tail, straight, strict=True))
    assert not torch.equal(torch.cat(straight[:5]), torch.cat(straight[70:75]))  # epochs differ in order


def test_hf_state_of_an_older_version_is_refused(hf_files, tok):
    d, _ = hf_files
    cfg = DataConfig(source="hf", path=str(d / "train.jsonl"), val_docs=10, shuffle=False)
    old = {"version": 3, "kind": "hf", "split": "train", "micro_yielded": 4, "shares": [None]}
    with pytest.raises(DataError, match=r"hf-stream state version 3 was saved by an older lmforge") as e:
        build_dataloader(cfg, tok, "train", T, 2).load_state_dict(old)
    assert "\n" not in str(e.value)
