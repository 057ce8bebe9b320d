"""data=hf across layouts: a dataset written by `datasets` (4 parquet files) and read with streaming=True gives
the same samples, step by step, on 1 or 2 ranks and with 0 or 2 workers; a checkpoint of 2 gloo ranks with 0
workers resumes on 1 rank with 2 workers on exactly the uninterrupted run's samples (shuffled stream, several
epochs: the shuffle buffer's order is replayed, not approximated)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import init_gloo, leave_gloo, spawn

from train.data import DataConfig, build_dataloader, get_tokenizer

T, STEPS, CUT = 16, 40, 25


@pytest.fixture(scope="module")
def stream_dir(tmp_path_factory) -> Path:
    import datasets

    d = tmp_path_factory.mktemp("hfstream")
    docs = [f"doc {i}: " + " ".join(f"w{i}x{j}" for j in range(3 + (i * 7) % 9)) for i in range(48)]
    for f in range(4):  # 4 files: the stream has 4 shards of its own
        datasets.Dataset.from_dict({"text": docs[f::4]}).to_parquet(str(d / f"train-{f:05d}-of-00004.parquet"))
    return d


def cfg_of(stream_dir: Path, workers: int = 0) -> DataConfig:
    return DataConfig(source="hf", path=str(stream_dir), val_docs=8, shuffle=True, num_workers=workers)


def steps(cfg, B, W, n, state=None, seed=3) -> list[torch.Tensor]:
    """x of every step over all ranks, rank-major: [B * W, T] per step (ranks built in one process)."""
    loaders = [build_dataloader(cfg, get_tokenizer("gpt2"), "train", T, B, 1, r, W, seed=seed) for r in range(W)]
    for ld in loaders:
        if state is not None:
            ld.load_state_dict(state)
    its = [iter(ld) for ld in loaders]
    return [torch.cat([next(it)[0] for it in its]) for _ in range(n)]


def _two_ranks(rank: int, world: int, port: int, cfg: DataConfig, out: Path) -> None:
    init_gloo(rank, world, port)
    ld = build_dataloader(cfg, get_tokenizer("gpt2"), "train", T, 2, 1, rank, world, seed=3)
    it = iter(ld)
    xs = [next(it)[0] for _ in range(CUT)]
    state = ld.state_dict()  # collective: every rank's state holds every shard's position
    torch.save({"xs": xs, "state": state}, out / f"rank{rank}.pt")
    leave_gloo()


def test_same_samples_on_every_layout(stream_dir):
    ref = steps(cfg_of(stream_dir), 4, 1, 12)
    assert all(torch.equal(a, b) for a, b in zip(steps(cfg_of(stream_dir), 2, 2, 12), ref))
    assert all(torch.equal(a, b) for a, b in zip(steps(cfg_of(stream_dir, workers=2), 1, 4, 12), ref))
    assert all(torch.equal(a, b) for a, b in zip(steps(cfg_of(stream_dir, workers=2), 4, 1, 12), ref))


def test_two_gloo_ranks_resume_on_one_rank_with_workers(stream_dir, tmp_path):
    straight = steps(cfg_of(stream_dir), 4, 1, STEPS)  # one process, no workers, uninterrupted
    spawn(_two_ranks, 2, cfg_of(stream_dir), tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert all(torch.equal(torch.cat([a, b]), s) for a, b, s in zip(r0["xs"], r1["xs"], straight))
    assert r0["state"] == r1["state"] and None not in r0["state"]["positions"]
    assert max(p["epoch"] for p in r0["state"]["positions"]) >= 1  # the cut is past a shard's first epoch
    resumed = steps(cfg_of(stream_dir, workers=2), 4, 1, STEPS - CUT, state=r1["state"])
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight[CUT:]))


def mixture_cfg(stream_dir: Path, workers: int = 0) -> DataConfig:
    """The stream (weight 0.7) mixed with a local text corpus written next to it (0.3)."""
    corpus = stream_dir.parent / "notes.jsonl"  # not in the dataset's dir: datasets would read it as a split
    if not corpus.exists():
        corpus.write_text("".join(f'{{"text": "note {i}: {" ".join(f"n{i}y{j}" for j in range(25))}"}}\n'
                                  for i in range(20)))
    return DataConfig(mixture=[{"source": "hf", "path": str(stream_dir), "val_docs": 8, "weight": 0.7},
                               {"source": "text", "path": str(corpus), "weight": 0.3}],
                      cache_dir=str(stream_dir.parent / "cache"), num_workers=workers)


def _two_ranks_mixture(rank: int, world: int, port: int, cfg: DataConfig, out: Path) -> None:
    init_gloo(rank, world, port)
    ld = build_dataloader(cfg, get_tokenizer("gpt2"), "train", T, 2, 1, rank, world, seed=3)
    it = iter(ld)
    xs = [next(it)[0] for _ in range(CUT)]
    torch.save({"xs": xs, "state": ld.state_dict()}, out / f"mix{rank}.pt")  # state_dict: collective
    leave_gloo()


def test_mixture_with_a_stream_resumes_from_two_gloo_ranks_on_one(stream_dir, tmp_path):
    straight = steps(mixture_cfg(stream_dir), 4, 1, STEPS)
    spawn(_two_ranks_mixture, 2, mixture_cfg(stream_dir), tmp_path)
    r0, r1 = (torch.load(tmp_path / f"mix{r}.pt", weights_only=False) for r in range(2))
    assert all(torch.equal(torch.cat([a, b]), s) for a, b, s in zip(r0["xs"], r1["xs"], straight))
    assert r0["state"] == r1["state"] and len(r0["state"]["stream_positions"]) == 4  # both ranks' shards
    resumed = steps(mixture_cfg(stream_dir, workers=2), 4, 1, STEPS - CUT, state=r1["state"])
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight[CUT:]))
