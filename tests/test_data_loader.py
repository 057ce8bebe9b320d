"""Indexed sources: packing, global-batch invariance over dp_size / grad_accum / workers, disjoint
ranks, world-size-free resume, and train.prepare shards == on-the-fly tokenization."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from train.data import DataConfig, build_dataloader, get_tokenizer
from train.prepare import main as prepare_main

T = 16


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """60 jsonl documents of distinct numbers: every window of the stream is unique."""
    d = tmp_path_factory.mktemp("corpus")
    with open(d / "docs.jsonl", "w") as f:
        for i in range(60):
            words = " ".join(str(1000 * i + j) for j in range(3 + (i * 7) % 23))
            f.write(json.dumps({"id": i, "text": f"Doc {i}: {words}."}) + "\n")
    return d / "docs.jsonl"


@pytest.fixture(scope="module")
def cfg(corpus, tmp_path_factory) -> DataConfig:
    return DataConfig(source="text", path=str(corpus), val_fraction=0.1,
                      cache_dir=str(tmp_path_factory.mktemp("cache")))


def docs_of(corpus: Path) -> list[str]:
    return [json.loads(line)["text"] for line in corpus.read_text().splitlines()]


def steps(cfg, tok, B, A, W, n_steps, *, workers=0, seed=3, state=None, split="train"):
    """Per optimizer step: the sorted list of (x, y) rows over all ranks and micro-steps (+ final states)."""
    cfg = DataConfig(**{**cfg.__dict__, "num_workers": workers})
    loaders = [build_dataloader(cfg, tok, split, T, B, A, r, W, seed=seed) for r in range(W)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    its = [iter(ld) for ld in loaders]
    out = []
    for _ in range(n_steps):
        rows = []
        for r, it in enumerate(its):
            for _ in range(A):
                x, y = next(it)
                assert x.shape == y.shape == (B, T) and x.dtype == torch.long
                assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
                rows += [(r, tuple(a.tolist()) + (int(b[-1]),)) for a, b in zip(x, y)]
        out.append(rows)
    return out, [ld.state_dict() for ld in loaders]


def as_sets(step_rows):
    return [Counter(w for _, w in rows) for rows in step_rows]


def test_packing_matches_independent_stream(cfg, corpus, tok):
    # oracle: train docs (every 10th doc held out) encoded, EOT after each, windows of T+1 with stride T
    docs = [d for i, d in enumerate(docs_of(corpus)) if (i + 1) // 10 == i // 10]
    stream = [t for d in docs for t in tok.encode(d) + [tok.eot_token]]
    windows = {tuple(stream[i * T:i * T + T + 1]) for i in range((len(stream) - 1) // T)}
    ld = build_dataloader(cfg, tok, "train", T, 4, seed=0)
    assert ld.n_samples == len(windows) == (len(stream) - 1) // T
    rows, _ = steps(cfg, tok, 1, 1, 1, ld.n_samples, seed=0)
    seen = [w for s in rows for _, w in s]
    # one epoch: every window exactly once, in a shuffled order
    assert Counter(seen) == Counter(windows)
    assert [w for w in seen] != sorted(windows, key=lambda w: stream.index(w[0]))


@pytest.mark.parametrize("B,A,W,workers", [(1, 4, 1, 0), (2, 1, 2, 0), (1, 2, 2, 2), (4, 1, 1, 2)])
def test_global_batch_invariant(cfg, tok, B, A, W, workers):
    n = 40  # 160 samples: crosses the epoch boundary (~107 windows)
    ref, _ = steps(cfg, tok, 4, 1, 1, n)
    got, _ = steps(cfg, tok, B, A, W, n, workers=workers)
    assert as_sets(got) == as_sets(ref)
    for rows in got:  # ranks never share a sample within a step
        per_rank = [{w for r, w in rows if r == k} for k in range(W)]
        assert sum(len(s) for s in per_rank) == len(set().union(*per_rank)) == B * A * W


def test_epochs_reshuffle_and_cover(cfg, tok):
    ld = build_dataloader(cfg, tok, "train", T, 2, seed=5)
    n = ld.n_samples
    rows, _ = steps(cfg, tok, 2, 1, 1, n, seed=5)  # 2 epochs
    flat = [w for s in rows for _, w in s]
    e0, e1 = flat[:n], flat[n:2 * n]
    assert len(set(e0)) == len(set(e1)) == n and set(e0) == set(e1)
    assert e0 != e1
    other, _ = steps(cfg, tok, 2, 1, 1, 5, seed=6)
    assert [w for s in other for _, w in s] != flat[:10]  # the seed matters


@pytest.mark.parametrize("W2,B2,A2,workers", [(2, 2, 1, 0), (1, 4, 1, 2), (4, 1, 1, 0), (1, 1, 4, 0)])
def test_resume_any_world_size(cfg, tok, W2, B2, A2, workers):
    straight, _ = steps(cfg, tok, 2, 1, 2, 12)
    first, states = steps(cfg, tok, 2, 1, 2, 5)
    assert all(s == states[0] for s in states[1:])  # every rank saves the same, world-size-free state
    assert states[0]["samples_consumed"] == 5 * 4
    resumed, _ = steps(cfg, tok, B2, A2, W2, 7, workers=workers, state=states[0])
    assert as_sets(first + resumed) == as_sets(straight)


def test_resume_mid_step_same_layout(cfg, tok):
    full = build_dataloader(cfg, tok, "train", T, 2, 3, 1, 2, seed=1)
    it = iter(full)
    head = [next(it) for _ in range(4)]  # one step and one micro-batch into the next
    state = full.state_dict()
    assert state["micro_in_step"] == 1
    tail = [next(it) for _ in range(5)]
    again = build_dataloader(cfg, tok, "train", T, 2, 3, 1, 2, seed=1)
    again.load_state_dict(state)
    it2 = iter(again)
    for x, y in tail:
        x2, y2 = next(it2)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert len(head) == 4


def test_val_is_ordered_finite_and_split_over_ranks(cfg, tok):
    one = build_dataloader(cfg, tok, "val", T, 2, seed=0)
    ranks = [build_dataloader(cfg, tok, "val", T, 1, 4, r, 2, seed=9) for r in range(2)]  # grad_accum ignored
    a = torch.cat([x for x, _ in one])
    assert len(one) == a.shape[0] // 2 and len(list(one)) == len(one)  # re-iterable, same length
    b = [[x for x, _ in r] for r in ranks]
    assert len(b[0]) == len(b[1]) == len(ranks[0])
    inter = torch.cat([torch.cat([b[0][k], b[1][k]]) for k in range(len(b[0]))])
    n = min(len(a), len(inter))
    assert torch.equal(a[:n], inter[:n])  # same order, independent of the seed and the rank split
    train_rows = {tuple(x.tolist()) for x, _ in [next(iter(build_dataloader(cfg, tok, "train", T, 64, seed=0)))]
                  for x in x}
    assert not train_rows & {tuple(r.tolist()) for r in a}  # held-out documents


def test_prepare_shards_equal_on_the_fly(cfg, corpus, tok, tmp_path):
    out = tmp_path / "tok"
    assert prepare_main(["--source", "text", "--path", str(corpus), "--val-fraction", "0.1", "--out", str(out),
                         "--shard-tokens", "200", "--no-progress"]) == 0
    header = json.loads((out / "index.json").read_text())
    assert header["dtype"] == "uint16" and len(header["splits"]["train"]["shards"]) > 3  # windows span shards
    shard_cfg = DataConfig(source="tokens", path=str(out))
    for split, n in (("train", 30), ("val", 3)):
        a = list(zip(range(n), build_dataloader(cfg, tok, split, T, 2, 2, 1, 2, seed=4)))
        b = list(zip(range(n), build_dataloader(shard_cfg, tok, split, T, 2, 2, 1, 2, seed=4)))
        assert len(a) == len(b) == n if split == "train" else len(a) == len(b) > 0
        for (_, (xa, ya)), (_, (xb, yb)) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_shakespeare_prepare_equals_on_the_fly(tmp_path, tok):
    """Acceptance: shards of the bundled corpus and on-the-fly tokenization give identical batches."""
    out = tmp_path / "shakespeare"
    assert prepare_main(["--out", str(out), "--shard-tokens", "400000", "--no-progress"]) == 0
    fly = DataConfig(source="shakespeare", cache_dir=str(tmp_path / "cache"), num_workers=2)
    shards = DataConfig(source="tokens", path=str(out))
    for split in ("train", "val"):
        la = build_dataloader(fly, tok, split, 64, 4, 2, 0, 2, seed=0)
        lb = build_dataloader(shards, tok, split, 64, 4, 2, 0, 2, seed=0)
        assert la.n_samples == lb.n_samples > (1000 if split == "train" else 50)
        pairs = [(xa, xb) for _, (xa, _), (xb, _) in zip(range(6), la, lb)]
        assert len(pairs) == 6 and all(torch.equal(xa, xb) for xa, xb in pairs)
    # a fixed held-out split: the tail of every play, and ~5% of the tokens
    h = json.loads((out / "index.json").read_text())["splits"]
    assert h["train"]["n_docs"] == h["val"]["n_docs"] == 38
    assert 0.03 < h["val"]["n_tokens"] / h["train"]["n_tokens"] < 0.07
    sample = tok.decode(next(iter(la))[0][0].tolist())
    assert "**" not in sample  # markdown markup is stripped


def test_dtype_uint32_for_large_vocab(tmp_path):
    from train.data.shards import TokenStore, token_dtype, write_tokens

    class Big:  # a vocabulary beyond uint16 (e.g. Gemma's 256k) stores uint32 tokens
        name, fingerprint, n_vocab, eot_token = "big", "big0", 256_000, 255_999

        def encode_batch(self, texts, num_threads=1):
            return [[70_000 + len(t), 3] for t in texts]

    write_tokens(tmp_path, {"train": lambda: iter(["ab", "abc"])}, Big(), fingerprint="f", source={},
                 progress=False)
    store = TokenStore(tmp_path, "train")
    assert token_dtype(256_000) == "uint32" and store.dtype == np.uint32
    assert store.read(0, 6).tolist() == [70_002, 3, 255_999, 70_003, 3, 255_999]


def _rank_build(args):
    path, cache, rank = args
    from train.data import DataConfig, build_dataloader, get_tokenizer

    cfg = DataConfig(source="text", path=path, cache_dir=cache, val_fraction=0.1)
    ld = build_dataloader(cfg, get_tokenizer("gpt2"), "train", T, 2, 1, rank, 2, seed=0)
    x, _ = next(iter(ld))
    return str(ld.store.root), x.tolist()


def test_ranks_build_the_cache_concurrently(corpus, tmp_path):
    """Two real processes (as two ranks of a node) tokenize into one cache entry without clobbering."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(2) as pool:
        (root0, x0), (root1, x1) = pool.map(_rank_build, [(str(corpus), str(tmp_path), r) for r in range(2)])
    assert root0 == root1
    assert [p.name for p in (tmp_path / "tokens").iterdir() if p.is_dir()] == [Path(root0).name]
    assert not list(Path(root0).glob("*.tmp*"))
    assert not {tuple(r) for r in x0} & {tuple(r) for r in x1}  # disjoint ranks
