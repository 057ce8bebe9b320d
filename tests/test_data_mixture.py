"""data.mixture at the loader: realised proportions, one stream for every micro-batch split / worker count /
world size, exact resume across world sizes, per-source epochs and max_epochs, reweighting on resume, and
one-line errors for bad entries.

The oracle for "which source gave this sample" is the sources' own windows: the three corpora use disjoint
words, so every window of the stream belongs to exactly one source's set of windows.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from train.data import DataConfig, DataError, build_dataloader, get_tokenizer
from train.data.shards import TokenStore

T = 16


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("gpt2")


def _write_corpus(path: Path, word: str, n_docs: int, words: int) -> Path:
    docs = [{"text": f"{word} {i}: " + " ".join(f"{word}{i}x{j}" for j in range(words))} for i in range(n_docs)]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("mix")
    return {"cache": str(d / "cache"),
            "a": str(_write_corpus(d / "alpha.jsonl", "alpha", 40, 30)),
            "b": str(_write_corpus(d / "beta.jsonl", "beta", 20, 20)),
            "c": str(_write_corpus(d / "gamma.jsonl", "gamma", 10, 10))}


def mix_cfg(corpora, weights=(0.5, 0.3, 0.2), workers=0, max_epochs=(None, None, None), **kw) -> DataConfig:
    entries = []
    for key, w, m in zip("abc", weights, max_epochs):
        e = {"source": "text", "path": corpora[key], "weight": w, "label": key}
        if m is not None:
            e["max_epochs"] = m
        entries.append(e)
    return DataConfig(mixture=entries, cache_dir=corpora["cache"], num_workers=workers, val_fraction=0.1, **kw)


def rows(cfg, tok, B, A, W, n_steps, *, state=None, seed=7, split="train"):
    """Every sample of n_steps optimizer steps in global order (rank-major within a step) + rank 0's state."""
    loaders = [build_dataloader(cfg, tok, split, T, B, A, r, W, seed=seed) for r in range(W)]
    for ld in loaders:
        if state is not None:
            ld.load_state_dict(state)
    its = [iter(ld) for ld in loaders]
    out = []
    for _ in range(n_steps):
        for it in its:
            for _ in range(A):
                x, y = next(it)
                assert x.shape == (B, T)
                out += [np.concatenate([a.numpy(), b.numpy()[-1:]]).tobytes() for a, b in zip(x, y)]
    return out, loaders[0]


def source_of(cfg, tok) -> dict[bytes, str]:
    """Every train window of every source (as bytes of T + 1 int64 tokens) -> its label."""
    ld = build_dataloader(cfg, tok, "train", T, 1, seed=0)
    table = {}
    for label, store in zip(ld.labels, ld.stores):
        for i in range((store.n_tokens - 1) // T):
            w = store.read(i * T, T + 1).tobytes()
            assert table.setdefault(w, label) == label  # disjoint corpora
    return table


def test_proportions_epochs_and_metrics(corpora, tok):
    cfg = mix_cfg(corpora)
    table = source_of(cfg, tok)
    stream, ld = rows(cfg, tok, 50, 2, 1, 100)  # 10,000 samples
    labels = [table[w] for w in stream]
    for label, w in zip("abc", (0.5, 0.3, 0.2)):
        assert abs(labels.count(label) / len(labels) - w) < 0.01, (label, labels.count(label))
    # each source repeats on its own: its samples cover its windows epoch after epoch, each once per epoch
    sizes = dict(zip(ld.labels, ld.sizes))
    for label in "abc":
        mine = [w for w, lab in zip(stream, labels) if lab == label]
        n = sizes[label]
        assert len(mine) > 2 * n
        assert len(set(mine[:n])) == n and set(mine[:n]) == set(mine[n:2 * n]) and mine[:n] != mine[n:2 * n]
    m = ld.metrics()
    for label in "abc":
        assert m[f"data/{label}/tokens"] == labels.count(label) * T
        assert m[f"data/{label}/epochs"] == pytest.approx(labels.count(label) / sizes[label], abs=1e-4)
    assert sum(m[f"data/{k}/tokens"] for k in "abc") == 10_000 * T
    other, _ = rows(cfg, tok, 50, 2, 1, 2, seed=8)
    assert other != stream[:200]  # the seed matters


def test_one_stream_for_every_layout(corpora, tok):
    """micro-batch 2 x accumulation 2 vs 4 x 1, 0 vs 2 workers, 1 vs 2 ranks: the same bytes in the same order."""
    ref, _ = rows(mix_cfg(corpora), tok, 4, 1, 1, 30)
    assert rows(mix_cfg(corpora), tok, 2, 2, 1, 30)[0] == ref
    assert rows(mix_cfg(corpora, workers=2), tok, 4, 1, 1, 30)[0] == ref
    assert rows(mix_cfg(corpora), tok, 2, 1, 2, 30)[0] == ref
    assert rows(mix_cfg(corpora, workers=2), tok, 1, 2, 2, 30)[0] == ref


@pytest.mark.parametrize("W2,B2,A2", [(1, 4, 1), (4, 1, 1)])
def test_resume_on_another_world_size(corpora, tok, W2, B2, A2):
    cfg = mix_cfg(corpora)
    straight, _ = rows(cfg, tok, 2, 1, 2, 25)
    head, ld = rows(cfg, tok, 2, 1, 2, 10)
    state = ld.state_dict()
    assert state["samples_consumed"] == 40 and sum(state["counts"]) == 40
    tail, _ = rows(cfg, tok, B2, A2, W2, 15, state=state)
    assert head + tail == straight


def test_max_epochs_stops_a_source(corpora, tok, caplog):
    cfg = mix_cfg(corpora, max_epochs=(None, None, 1))
    table = source_of(cfg, tok)
    caplog.set_level(logging.INFO, logger="train")
    stream, ld = rows(cfg, tok, 20, 1, 1, 50)
    c = [w for w in stream if table[w] == "c"]
    n_c = ld.sizes[ld.labels.index("c")]
    assert len(c) == len(set(c)) == n_c  # one pass, every window once, then never again
    last = max(i for i, w in enumerate(stream) if table[w] == "c")
    after = [table[w] for w in stream[last + 1:]]
    assert len(after) > 500 and abs(after.count("a") / len(after) - 0.5 / 0.8) < 0.03
    assert any("'c' reached max_epochs=1" in r.message for r in caplog.records)
    assert any("'b' repeats: starting epoch 2" in r.message for r in caplog.records)
    # a resume past that point keeps c stopped
    head, ld = rows(cfg, tok, 20, 1, 1, 30)
    tail, _ = rows(cfg, tok, 10, 2, 1, 20, state=ld.state_dict())
    assert head + tail == stream


def test_all_sources_run_out(corpora, tok):
    cfg = mix_cfg(corpora, max_epochs=(1, 1, 1))
    ld = build_dataloader(cfg, tok, "train", T, 10, seed=0)
    it = iter(ld)
    with pytest.raises(DataError, match="every source reached its max_epochs after"):
        for _ in range(10_000):
            next(it)
    # every window of every source exactly once, then the stream ends (a partial micro-batch is not served)
    assert ld.schedule.end == sum(ld.sizes) and list(ld.schedule.counts_at(ld.schedule.end)) == ld.sizes
    assert sum(ld.counts()) == sum(ld.sizes) // 10 * 10


def test_reweight_at_resume(corpora, tok):
    cfg = mix_cfg(corpora)
    table = source_of(cfg, tok)
    head, ld = rows(cfg, tok, 10, 1, 1, 20)
    state = ld.state_dict()
    new = mix_cfg(corpora, weights=(0.2, 0.2, 0.6))
    with pytest.raises(DataError) as e:
        build_dataloader(new, tok, "train", T, 10, seed=7).load_state_dict(state)
    msg = str(e.value)
    assert "\n" not in msg and "data.reweight_at_resume=true" in msg and "a=0.5" in msg and "c=0.6" in msg
    flagged = mix_cfg(corpora, weights=(0.2, 0.2, 0.6), reweight_at_resume=True)
    tail, ld2 = rows(flagged, tok, 10, 1, 1, 200, state=state)
    labels = [table[w] for w in tail]
    assert abs(labels.count("c") / len(labels) - 0.6) < 0.02
    # the per-source counts continue from the checkpoint's (a source's epoch goes on, no window repeats early)
    c_head = [w for w in head if table[w] == "c"]
    c_all = c_head + [w for w in tail if table[w] == "c"]
    n_c = ld2.sizes[ld2.labels.index("c")]
    assert len(set(c_all[:n_c])) == n_c
    # the reweighted state resumes exactly on its own (no flag needed: the weights now match)
    mid, ld3 = rows(flagged, tok, 10, 1, 1, 50, state=state)
    rest, _ = rows(mix_cfg(corpora, weights=(0.2, 0.2, 0.6)), tok, 5, 2, 1, 150, state=ld3.state_dict())
    assert mid + rest == tail


def test_val_mixture_and_per_source_loaders(corpora, tok):
    cfg = mix_cfg(corpora)
    val = build_dataloader(cfg, tok, "val", T, 2, seed=0)
    assert set(val.sources) <= {"a", "b", "c"} and "a" in val.sources
    first = [x.clone() for x, _ in val]
    again = [x.clone() for x, _ in val]
    assert len(first) == len(val) and all((a == b).all() for a, b in zip(first, again))  # ordered, restarts
    a_only = next(iter(val.sources["a"]))[0]
    store = TokenStore(val.sources["a"].store.root, "val")
    assert (a_only[0].numpy() == store.read(0, T)).all()


@pytest.mark.parametrize("mixture,match", [
    ([{"source": "text", "weight": -0.2}], r"data.mixture\[0\].weight=-0.2 must be a finite number >= 0"),
    ([{"source": "shakespeare", "weight": 0}, {"source": "shakespeare", "weight": 0.0}],
     r"data.mixture weights are all zero"),
    ([{"source": "shakespeare", "weight": 1}, {"source": "shakespeare"}], r"data.mixture\[1\] has no weight"),
    ([{"source": "text", "path": "/nonexistent/x.jsonl", "weight": 1}],
     r"data.mixture\[0\] \(x\): .*/nonexistent/x.jsonl"),
    ([{"source": "shakespeare", "weight": 1, "tokenizer": "cl100k_base"}], r"unknown key\(s\) \['tokenizer'\]"),
    ([{"source": "hf", "name": "x", "weight": 1, "max_epochs": 1}], r"a streamed \(hf\) source has no known length"),
    ([{"source": "hff", "weight": 1}], r"source='hff' cannot be mixed; allowed: shakespeare, text, tokens, hf"),
    ([{"source": "shakespeare", "weight": 1, "max_epochs": 0}], r"max_epochs=0 must be an integer >= 1"),
    ([{"source": "shakespeare", "weight": 1}, {"source": "shakespeare", "weight": 1e-6}], r"below the smallest share"),
    ([], r"data.mixture must be a non-empty list"),
])
def test_bad_entries_one_line(tmp_path, tok, mixture, match):
    cfg = DataConfig(mixture=mixture, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=match) as e:
        build_dataloader(cfg, tok, "train", T, 2)
    assert "\n" not in str(e.value)


def test_empty_source_one_line(tmp_path, tok, corpora):
    (tmp_path / "empty.jsonl").write_text("")
    cfg = DataConfig(mixture=[{"source": "text", "path": corpora["a"], "weight": 1},
                              {"source": "text", "path": str(tmp_path / "empty.jsonl"), "weight": 1}],
                     cache_dir=corpora["cache"])
    with pytest.raises(DataError, match=r"data.mixture\[1\] \(empty\): .*empty.jsonl") as e:
        build_dataloader(cfg, tok, "train", T, 2)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A dataset written by `datasets` as 4 parquet files, read as a stream."""
    import datasets

    d = tmp_path_factory.mktemp("hfmix")
    docs = [f"web {i}: " + " ".join(f"w{i}x{j}" for j in range(3 + (i * 7) % 9)) for i in range(48)]
    for f in range(4):
        datasets.Dataset.from_dict({"text": docs[f::4]}).to_parquet(str(d / f"train-{f:05d}-of-00004.parquet"))
    return d


def stream_cfg(corpora, hf_dir, workers=0) -> DataConfig:
    return DataConfig(mixture=[{"source": "hf", "path": str(hf_dir), "val_docs": 8, "weight": 0.6, "label": "web"},
                               {"source": "text", "path": corpora["a"], "weight": 0.4, "label": "a"}],
                      cache_dir=corpora["cache"], num_workers=workers, val_fraction=0.1)


def test_streamed_source_in_a_mixture(corpora, hf_dir, tok):
    """An hf stream mixes with an indexed source: one stream for every layout and worker count, the weights
    realised, exact resume with other workers / micro-batches, a val loss per source."""
    table = source_of(mix_cfg(corpora), tok)  # the indexed source's windows
    ref, ld = rows(stream_cfg(corpora, hf_dir), tok, 4, 1, 1, 60)
    assert ld.describe().startswith("web 0.6 (stream)")
    labels = ["a" if w in table else "web" for w in ref]
    assert abs(labels.count("web") / len(labels) - 0.6) < 0.05
    assert rows(stream_cfg(corpora, hf_dir), tok, 2, 2, 1, 60)[0] == ref
    assert rows(stream_cfg(corpora, hf_dir), tok, 2, 1, 2, 60)[0] == ref
    assert rows(stream_cfg(corpora, hf_dir, workers=2), tok, 1, 2, 2, 60)[0] == ref
    head, ld = rows(stream_cfg(corpora, hf_dir, workers=2), tok, 4, 1, 1, 25)
    state = ld.state_dict()
    assert len(state["stream_positions"]) == state["stream_shards"]["0"] == 4  # every shard's position
    tail, _ = rows(stream_cfg(corpora, hf_dir), tok, 2, 2, 1, 35, state=state)
    assert head + tail == ref
    m = ld.metrics()
    assert m["data/web/tokens"] + m["data/a/tokens"] == 25 * 4 * T and "data/web/epochs" not in m
    val = build_dataloader(stream_cfg(corpora, hf_dir), tok, "val", T, 2, seed=0)
    assert list(val.sources) == ["web", "a"]
    first = [x for _, (x, _) in zip(range(4), val)]
    assert torch.equal(first[0], next(iter(val.sources["web"]))[0])  # the sources take turns
    assert torch.equal(first[1], next(iter(val.sources["a"]))[0])
