"""`data.mixture`: a weighted mixture of indexed sources, ordered by global sample index.

Which source feeds position p of the endless training order is a pure function of (seed, weights, p):
positions come in blocks of BLOCK; every block holds each source s exactly n_s times (BLOCK * w_s rounded by
largest remainder, so a block's proportions are the weights to 1/BLOCK), in an order permuted by a generator
seeded with (seed, segment start, block). The number of samples each source gave before p is then known in
O(1) (whole blocks * n_s + a prefix count inside p's block), and position p is sample k of its source, whose
window is that source's own seeded per-epoch permutation at k (epoch of the source = k // its windows).

Ranks, micro-batches and workers take positions exactly as the single-source loader does (train/data/loader.py),
so the stream is the same for every world size, micro-batch split and worker count, and the state (samples
consumed + the schedule's segments) resumes on any layout.

A schedule is a list of segments (start position, weights, samples already drawn per source). A source with
`max_epochs` that runs out ends a segment: the next one starts right after its last sample, its weight spread
over the others in proportion. `data.reweight_at_resume=true` starts a new segment at the resume position.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from train.data.config import DataConfig
from train.data.errors import DataError
from train.data.loader import SampleOrder, check_seed_and_split
from train.data.shards import TokenStore
from train.data.tokenizer import Tokenizer

log = logging.getLogger("train")

STATE_VERSION = 1
BLOCK = 4096  # positions per block: each source's share of a block is exact to 1 / BLOCK
# entry keys that set up one source (the rest of a single-source config is shared by the whole mixture)
SOURCE_KEYS = ("source", "path", "name", "subset", "split", "val_split", "val_docs", "text_field", "streaming",
               "val_fraction", "shuffle", "cache_dir", "stream_shards")
ENTRY_KEYS = (*SOURCE_KEYS, "weight", "label", "max_epochs")
MIXABLE = ("shakespeare", "text", "tokens", "hf")


@dataclass(frozen=True)
class MixtureEntry:
    """One parsed `data.mixture` entry."""

    cfg: DataConfig
    weight: float
    label: str
    max_epochs: int | None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_mixture(cfg: DataConfig) -> list[MixtureEntry]:
    """The entries of `cfg.mixture`, validated (one-line DataError naming the entry and the bad value)."""
    mix = cfg.mixture
    if not isinstance(mix, (list, tuple)) or not mix:
        raise DataError(f"data.mixture must be a non-empty list of sources, got {mix!r}")
    entries, labels = [], set()
    for i, e in enumerate(mix):
        where = f"data.mixture[{i}]"
        if not isinstance(e, dict):
            raise DataError(f"{where} must be a mapping like {{source: shakespeare, weight: 0.5}}, got {e!r}")
        unknown = sorted(set(e) - set(ENTRY_KEYS))
        if unknown:
            hint = " (all sources share data.tokenizer / data.num_workers)" if set(unknown) & {
                "tokenizer", "num_workers"} else ""
            raise DataError(f"{where} has unknown key(s) {unknown}{hint}; allowed: {', '.join(ENTRY_KEYS)}")
        if "weight" not in e or e["weight"] is None:
            raise DataError(f"{where} has no weight; every entry needs weight: <number >= 0>")
        w = e["weight"]
        if not _number(w) or not math.isfinite(w) or w < 0:
            raise DataError(f"{where}.weight={w!r} must be a finite number >= 0")
        me = e.get("max_epochs")
        if me is not None and (not isinstance(me, int) or isinstance(me, bool) or me < 1):
            raise DataError(f"{where}.max_epochs={me!r} must be an integer >= 1 (or unset: the source repeats)")
        src = e.get("source", "shakespeare")
        if src not in MIXABLE:
            raise DataError(f"{where}.source={src!r} cannot be mixed; allowed: {', '.join(MIXABLE)}")
        if src == "hf" and me is not None:
            raise DataError(f"{where}.max_epochs={me!r}: a streamed (hf) source has no known length; it repeats "
                            f"(prepare it with python -m train.prepare and mix it as source: tokens to cap it)")
        shared = {f.name: getattr(cfg, f.name) for f in fields(DataConfig)
                  if f.name in ("tokenizer", "num_workers", "cache_dir", "shuffle", "val_fraction", "text_field")}
        sub = DataConfig(**{**shared, **{k: e[k] for k in SOURCE_KEYS if k in e}, "source": src})
        label = e.get("label") or _default_label(sub)
        if not isinstance(label, str):
            raise DataError(f"{where}.label={label!r} must be a string")
        if label in labels:
            label = f"{label}{i}" if "label" not in e else label
            if label in labels:
                raise DataError(f"{where}.label={label!r} is used twice; labels must be unique")
        labels.add(label)
        entries.append(MixtureEntry(sub, float(w), label, me))
    if sum(x.weight for x in entries) <= 0:
        raise DataError(f"data.mixture weights are all zero ({[x.weight for x in entries]}); "
                        f"at least one must be > 0")
    block_counts(normalize([x.weight for x in entries]), [x.label for x in entries])  # every weight > 0 drawn
    return entries


def _default_label(c: DataConfig) -> str:
    if c.source == "shakespeare" or not c.path:
        return c.source
    import os

    stem = os.path.basename(str(c.path).rstrip("/*").rstrip("/")) or c.source
    return stem.split(".")[0] or c.source


def normalize(weights) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def block_counts(weights: np.ndarray, labels: list[str] | None = None) -> np.ndarray:
    """Positions of each source in a block of BLOCK: BLOCK * w rounded by largest remainder (ties: lower index)."""
    exact = weights * BLOCK
    n = np.floor(exact).astype(np.int64)
    rest = BLOCK - int(n.sum())
    order = sorted(range(len(weights)), key=lambda s: (-(exact[s] - n[s]), s))
    for s in order[:rest]:
        n[s] += 1
    small = [s for s in range(len(weights)) if weights[s] > 0 and n[s] == 0]
    if small:
        s = small[0]
        name = labels[s] if labels else str(s)
        raise DataError(f"data.mixture weight of {name!r} is {weights[s]:.3g} of the total, below the smallest "
                        f"share 1/{BLOCK}; raise it or set it to 0")
    return n


class MixtureSchedule:
    """Global position -> (source, sample index within that source); see the module docstring.

    `segments`: the explicit segments [(start, weights, base counts)] (the first at 0; a reweighted resume adds
    one); segments that start where a source reaches its max_epochs are derived from them.
    """

    def __init__(self, weights, sizes: list[int], max_epochs: list[int | None], seed: int,
                 segments: list[tuple[int, list[float], list[int]]] | None = None,
                 labels: list[str] | None = None) -> None:
        self.sizes, self.max_epochs, self.seed = list(sizes), list(max_epochs), seed
        self.labels = labels or [str(s) for s in range(len(sizes))]
        self.caps = [None if m is None else m * n for m, n in zip(max_epochs, sizes)]
        S = len(sizes)
        self.explicit = [(0, list(normalize(weights)), [0] * S)] if segments is None else [
            (int(a), list(map(float, w)), list(map(int, b))) for a, w, b in segments]
        self.end: int | None = None  # first position past the last sample (every source reached max_epochs)
        self.exhausted_at: dict[int, int] = {}  # source -> position of its last sample
        self._cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._build()

    # segments: (start, weights (0 for sources run out), base counts, counts per block)
    def _build(self) -> None:
        self.segs = []
        for start, w, base in self.explicit:
            self._add(start, np.asarray(w, dtype=np.float64), np.asarray(base, dtype=np.int64))
        while self.end is None:  # derive the segments that start where a source runs out
            start, w, base, n = self.segs[-1]
            hits = []
            for s, cap in enumerate(self.caps):
                if cap is None or n[s] == 0:
                    continue
                m = cap - int(base[s])  # draws left
                b, j = divmod(m - 1, int(n[s]))
                src, _, _ = self._block_of(len(self.segs) - 1, b, cache=False)
                hits.append((start + b * BLOCK + int(np.flatnonzero(src == s)[j]), s))
            if not hits:
                break
            p, s = min(hits)
            self.exhausted_at[s] = p
            counts = self._counts_in(len(self.segs) - 1, p + 1)
            w = w.copy()
            w[s] = 0.0
            if w.sum() == 0:
                self.end = p + 1
                break
            self._add(p + 1, w / w.sum(), counts)
        self.starts = [sg[0] for sg in self.segs]

    def _add(self, start: int, w: np.ndarray, base: np.ndarray) -> None:
        for s, cap in enumerate(self.caps):  # a source already at its cap draws no more
            if cap is not None and base[s] >= cap:
                self.exhausted_at.setdefault(s, start - 1)
                w = w.copy()
                w[s] = 0.0
        if w.sum() == 0:
            self.end = start
            w = np.ones_like(w)  # an empty tail; never read
        w = w / w.sum()
        self.segs.append((start, w, base, block_counts(w, self.labels)))

    def _block_of(self, seg: int, b: int, cache: bool = True):
        """(source of each position [BLOCK], its rank among that source's positions [BLOCK], prefix counts
        [BLOCK + 1, S]) of block b of segment seg."""
        key = (seg, b)
        if key in self._cache:
            return self._cache[key]
        start, _, _, n = self.segs[seg]
        src = np.repeat(np.arange(len(n)), n)
        src = np.random.default_rng([self.seed, start, b]).permutation(src)
        onehot = np.zeros((BLOCK + 1, len(n)), dtype=np.int64)
        onehot[np.arange(1, BLOCK + 1), src] = 1
        prefix = np.cumsum(onehot, axis=0)  # samples of each source before position o of the block
        rank = prefix[np.arange(BLOCK), src]
        out = (src, rank, prefix)
        if cache:
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = out
        return out

    def _seg_index(self, p: int) -> int:
        import bisect

        return bisect.bisect_right(self.starts, p) - 1

    def _counts_in(self, seg: int, p: int) -> np.ndarray:
        start, _, base, n = self.segs[seg]
        b, o = divmod(p - start, BLOCK)
        return base + b * n + self._block_of(seg, b, cache=False)[2][o]

    def counts_at(self, p: int) -> np.ndarray:
        """Samples drawn from each source at positions [0, p)."""
        if self.end is not None and p >= self.end:
            p = self.end
        seg = self._seg_index(p)
        start, _, base, n = self.segs[seg]
        b, o = divmod(p - start, BLOCK)
        return base + b * n + self._block_of(seg, b)[2][o]

    def position_of(self, s: int, k: int) -> int | None:
        """The global position of source s's sample k (0-based), None if the schedule never draws it."""
        for i, (start, _, base, n) in enumerate(self.segs):
            nxt = self.segs[i + 1][2][s] if i + 1 < len(self.segs) else None
            if k < base[s] or n[s] == 0 or (nxt is not None and k >= nxt):
                continue
            b, j = divmod(k - int(base[s]), int(n[s]))
            p = start + b * BLOCK + int(np.flatnonzero(self._block_of(i, b, cache=False)[0] == s)[j])
            if (i + 1 < len(self.segs) and p >= self.segs[i + 1][0]) or (self.end is not None and p >= self.end):
                return None
            return p
        return None

    def sources(self, lo: int, hi: int) -> np.ndarray:
        """The source of each position in [lo, hi), looked up a BLOCK-aligned chunk at a time (cached): a step's
        global batch costs a slice, not a lookup."""
        if self.end is not None and hi > self.end:
            self.lookup(np.arange(lo, hi, dtype=np.int64))  # raises the one-line error
        cache = self.__dict__.setdefault("_src_chunks", {})
        parts, p = [], lo
        while p < hi:
            c = p // BLOCK
            if c not in cache:
                a = c * BLOCK
                b = a + BLOCK if self.end is None else min(a + BLOCK, self.end)
                if len(cache) >= 4:
                    cache.pop(next(iter(cache)))
                cache[c] = self.lookup(np.arange(a, b, dtype=np.int64))[0]
            q = min(hi, (c + 1) * BLOCK)
            parts.append(cache[c][p - c * BLOCK:q - c * BLOCK])
            p = q
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def lookup(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, sample index within the source) of each global position."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.end is not None and positions.size and int(positions.max()) >= self.end:
            raise DataError(f"data.mixture: every source reached its max_epochs after {self.end} samples "
                            f"({', '.join(f'{l}={m}' for l, m in zip(self.labels, self.max_epochs))}); "
                            f"raise max_epochs or lower train.max_steps")
        src = np.empty_like(positions)
        k = np.empty_like(positions)
        segs = np.searchsorted(np.asarray(self.starts, dtype=np.int64), positions, side="right") - 1
        for seg in np.unique(segs).tolist():  # a micro-batch is contiguous: one or two (segment, block) groups
            start, _, base, n = self.segs[seg]
            in_seg = np.flatnonzero(segs == seg)
            b, o = np.divmod(positions[in_seg] - start, BLOCK)
            for bb in np.unique(b).tolist():
                sel = in_seg[b == bb]
                oo = o[b == bb]
                s_blk, rank, _ = self._block_of(seg, bb)
                s = s_blk[oo]
                src[sel], k[sel] = s, base[s] + bb * n[s] + rank[oo]
        return src, k


class _MixWindows(Dataset):
    """Batched map-style dataset: (sources [B], window indices [B]) -> (x, y) LongTensors [B, T]."""

    def __init__(self, stores: list[TokenStore], seq_len: int) -> None:
        self.stores, self.seq_len = stores, seq_len

    def __getitem__(self, pairs: tuple[list[int], list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        T, stores = self.seq_len, self.stores
        w = torch.from_numpy(np.stack([stores[s].read(i * T, T + 1) for s, i in zip(*pairs)]))  # [B, T+1]
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class _MixMicroBatches(Sampler):
    """This rank's micro-batches of (source, window) pairs from a global position on (as loader._MicroBatches)."""

    def __init__(self, loader: MixtureLoader, start: int, skip_micro: int) -> None:
        self.l, self.start, self.skip = loader, start, skip_micro

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        l = self.l
        B, A, r = l.micro_batch_size, l.grad_accum, l.dp_rank
        step, j = divmod(self.skip, A)
        while l.train or step < l.val_steps:
            if l.train:
                first = self.start + step * l.global_batch + r * B * A + j * B
            else:
                first = step * B * l.dp_size + r * B
            yield l.pairs(np.arange(first, first + B, dtype=np.int64))
            j += 1
            if j == A or not l.train:
                step, j = step + 1, 0


@dataclass
class _StreamSource:
    """A streamed (hf) source of a mixture: its records (seeded shuffle), text field and shard count."""

    ds: object
    text_field: str
    n_shards: int
    ds_state: bool


class _StepPlans:
    """Per optimizer step, where the streamed sources' windows go, computed for a run of steps at a time (about
    BLOCK positions) instead of per step: `row(k)` -> (source of each of the G positions of step k,
    each streamed position's earlier draws in its shard's range of that step, {source: windows per shard})."""

    def __init__(self, schedule: MixtureSchedule, streams: dict, global_batch: int) -> None:
        self.schedule, self.streams, self.G = schedule, streams, global_batch
        self.S = max(1, BLOCK // global_batch)  # steps per plan
        self.k0 = None

    def _plan(self, k0: int) -> None:
        S, G = self.S, self.G
        self.src = self.schedule.sources(k0 * G, (k0 + S) * G).reshape(S, G)
        self.earlier = np.zeros((S, G), dtype=np.int64)
        self.counts = {}
        for s, stream in self.streams.items():
            m = (self.src == s).reshape(S, stream.n_shards, -1)  # [step, shard, position in the shard's range]
            self.earlier[m.reshape(S, G)] = (np.cumsum(m, axis=2) - 1)[m]
            self.counts[s] = m.sum(axis=2)  # [step, shard]
        self.k0 = k0

    def row(self, k: int) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
        if self.k0 is None or not self.k0 <= k < self.k0 + self.S:
            self._plan(k)
        i = k - self.k0
        return self.src[i], self.earlier[i], {s: c[i] for s, c in self.counts.items()}


class _StreamSteps(torch.utils.data.IterableDataset):
    """One item per optimizer step and DataLoader worker: {"source:shard": (windows [n, T+1], position after
    them)} for this worker's shards of the rank's streamed-source shards, n = the positions the schedule gives
    that source inside that shard's range of the step's global batch."""

    def __init__(self, streams: dict[int, _StreamSource], schedule: MixtureSchedule, global_batch: int,
                 shards: list[tuple[int, int]], first_step: int, resume: dict[str, dict], seq_len: int,
                 threads: int, tok: Tokenizer) -> None:
        self.streams, self.schedule, self.G, self.shards = streams, schedule, global_batch, shards
        self.first_step, self.resume, self.seq_len, self.threads = first_step, resume, seq_len, threads
        self.tok = tok

    def __iter__(self):
        from datasets.distributed import split_dataset_by_node

        from train.data.hf import _GROUP_CHARS, _MIN_GROUP_CHARS, _Packer

        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        mine = self.shards[w::nw]
        group = max(_MIN_GROUP_CHARS, _GROUP_CHARS // max(1, len(mine)))
        tok = self.tok

        def part_of(src: _StreamSource, v: int):
            return lambda: split_dataset_by_node(src.ds, rank=v, world_size=src.n_shards)

        packers = {}
        for s, v in mine:
            src = self.streams[s]
            packers[(s, v)] = iter(_Packer(part_of(src, v), tok, src.text_field, self.seq_len, 1,
                                           self.resume.get(f"{s}:{v}"), self.threads, group,
                                           f"source {s} shard {v} of {src.n_shards}", src.ds_state))
        k = self.first_step
        plans = _StepPlans(self.schedule, self.streams, self.G)
        mine_of = {s: np.array([v for ss, v in packers if ss == s], dtype=np.int64) for s in self.streams}
        mine_of = {s: vs for s, vs in mine_of.items() if vs.size}
        while True:
            item = {}
            counts = plans.row(k)[2]
            for s, vs in mine_of.items():
                per = counts[s][vs]  # windows of each of this worker's shards of source s in this step
                for v, n in zip(vs[per > 0].tolist(), per[per > 0].tolist()):  # the others keep their position
                    it = packers[(s, v)]
                    if n == 1:
                        win, pos = next(it)
                    else:
                        wins = [next(it) for _ in range(n)]
                        win, pos = np.concatenate([w for w, _ in wins]), wins[-1][1]
                    item[(s, v)] = (win, pos)
            yield item
            k += 1


class _TakeTurns:
    """The val loader of a mixture with streamed sources: the sources' own val loaders, a micro-batch each in
    turn (a source whose pass ends drops out); `sources` gives each for its own val loss."""

    def __init__(self, sources: dict) -> None:
        self.sources = sources

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        its = [iter(ld) for ld in self.sources.values()]
        while its:
            for it in list(its):
                try:
                    yield next(it)
                except StopIteration:
                    its.remove(it)


class MixtureLoader:
    """Loader of `data.mixture`: same iteration / state interface as `IndexedLoader`.

    train: endless mixture in global-sample order. val: the sources that have a val split, mixed with their
    weights (renormalized) in order, one pass of `val_steps` units restarted at every `iter()`; `sources`
    maps each label to that source's own val loader (the trainer reports a val loss per source).
    """

    def __init__(self, entries: list[MixtureEntry], stores: list[TokenStore | None], split: str, seq_len: int,
                 micro_batch_size: int, grad_accum: int, dp_rank: int, dp_size: int, seed: int,
                 num_workers: int, reweight_at_resume: bool = False, sources: dict | None = None,
                 streams: dict | None = None, tok: Tokenizer | None = None) -> None:
        self.tok = tok
        self.entries, self.stores, self.split, self.train = entries, stores, split, split == "train"
        self.labels = [e.label for e in entries]
        self.seq_len, self.micro_batch_size, self.grad_accum = seq_len, micro_batch_size, grad_accum
        self.dp_rank, self.dp_size, self.seed, self.num_workers = dp_rank, dp_size, seed, num_workers
        self.reweight_at_resume = reweight_at_resume
        self.global_batch = micro_batch_size * grad_accum * dp_size
        self.streams = streams or {}  # source index -> _StreamSource (hf): packed by shards, see _iter_streams
        self.sizes = [0 if st is None else max(0, st.n_tokens - 1) // seq_len for st in stores]
        for e, st, n in zip(entries, stores, self.sizes):
            if st is not None and n == 0 and (e.weight > 0 or not self.train):
                raise DataError(f"data.mixture source {e.label!r}: the {split} split of {st.describe()} has "
                                f"{st.n_tokens} tokens, fewer than one window of seq_len {seq_len} + 1")
        self.weights = list(normalize([e.weight for e in entries]))
        self.max_epochs = [e.max_epochs if self.train else None for e in entries]
        self.orders = [SampleOrder(n, seed + 1000 * (s + 1), e.cfg.shuffle and self.train)
                       for s, (n, e) in enumerate(zip(self.sizes, entries))]
        self.schedule = MixtureSchedule(self.weights, self.sizes, self.max_epochs, seed, labels=self.labels)
        self.sources = sources or {}
        self.val_steps = 0
        if not self.train:
            self.val_steps = sum(self.sizes) // (micro_batch_size * dp_size)
            if self.val_steps < 1:
                raise DataError(f"the val splits of data.mixture hold {sum(self.sizes)} windows of seq_len {seq_len};"
                                f" one eval batch over all ranks needs {micro_batch_size * dp_size}")
        self.dataset = _MixWindows(stores, seq_len)
        self._consumed, self._micro = 0, 0
        self._stream_pos: dict[str, dict] = {}  # "source:shard" -> packer position at the last step boundary
        self._chunks: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # BLOCK-aligned chunk -> (sources, windows)
        if self.train:
            self._plan_events()

    def __len__(self) -> int:
        if self.train:
            raise TypeError("the train loader is endless")
        return self.val_steps

    def pairs(self, positions: np.ndarray) -> tuple[list[int], list[int]]:
        """(source, window index) of contiguous global positions, from a cache of BLOCK positions at a time:
        the schedule and the per-source permutations are looked up once per block, not per micro-batch."""
        first, last = int(positions[0]), int(positions[-1])
        end = self.schedule.end
        if end is not None and last >= end:
            self.schedule.lookup(positions)  # raises the one-line error
        parts_s, parts_i = [], []
        p = first
        while p <= last:
            c = p // BLOCK
            if c not in self._chunks:
                lo = c * BLOCK
                hi = lo + BLOCK if end is None else min(lo + BLOCK, end)
                src, k = self.schedule.lookup(np.arange(lo, hi, dtype=np.int64))
                idx = np.zeros_like(k)  # streamed sources: unused (their shards hand out windows in order)
                for s in np.unique(src).tolist():
                    if s not in self.streams:
                        sel = src == s
                        idx[sel] = self.orders[s].indices(k[sel])
                if len(self._chunks) >= 4:
                    self._chunks.pop(next(iter(self._chunks)))
                self._chunks[c] = (src, idx)
            src, idx = self._chunks[c]
            q = min(last + 1, (c + 1) * BLOCK)
            parts_s.append(src[p - c * BLOCK:q - c * BLOCK])
            parts_i.append(idx[p - c * BLOCK:q - c * BLOCK])
            p = q
        if len(parts_s) == 1:
            return parts_s[0].tolist(), parts_i[0].tolist()
        return np.concatenate(parts_s).tolist(), np.concatenate(parts_i).tolist()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.streams:
            yield from self._iter_streams()
            return
        if not self.train:
            self._consumed, self._micro = 0, 0
        sampler = _MixMicroBatches(self, self._consumed, self._micro)
        gen = torch.Generator().manual_seed(self.seed)  # creating workers never draws from the global RNG
        dl = DataLoader(self.dataset, sampler=sampler, batch_size=None, num_workers=self.num_workers, generator=gen,
                        pin_memory=torch.cuda.is_available())
        for xy in dl:
            self._micro += 1
            if self.train and self._micro % self.grad_accum == 0:
                self._announce()
            yield xy

    def _stream_shards(self) -> list[tuple[int, int]]:
        """(source, shard) of every streamed source's shard that this rank's slice of a global batch covers."""
        G, BA = self.global_batch, self.micro_batch_size * self.grad_accum
        out = []
        for s, src in self.streams.items():
            c = G // src.n_shards  # positions per shard per step
            out += [(s, v) for v in range(self.dp_rank * BA // c, ((self.dp_rank + 1) * BA - 1) // c + 1)]
        return out

    def _iter_streams(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """With streamed sources: as the hf loader, position p of step k (offset q in the global batch) belongs to
        shard q // (G / V) of a streamed source's V shards, and takes that shard's next window; the workers pack
        this rank's shards one step at a time (as many windows per shard as the schedule gives its source there),
        indexed sources are read here. The samples depend on G and the shard counts only, not on the layout."""
        from train.data.hf import _as_is, _threads_per_worker

        G, B, A, r, T = self.global_batch, self.micro_batch_size, self.grad_accum, self.dp_rank, self.seq_len
        BA = B * A
        stream = _StreamSteps(self.streams, self.schedule, G, self._stream_shards(), self._consumed // G,
                              dict(self._stream_pos), self.seq_len, _threads_per_worker(self.num_workers),
                              self.tok)
        gen = torch.Generator().manual_seed(self.seed)  # creating workers never draws from the global RNG
        # workers may run several steps ahead: one that is tokenizing a group does not stall the others
        dl = DataLoader(stream, batch_size=None, num_workers=self.num_workers, generator=gen, collate_fn=_as_is,
                        prefetch_factor=16 if self.num_workers else None)
        pin = torch.cuda.is_available()
        items = iter(dl)
        skip = self._micro
        plans = _StepPlans(self.schedule, self.streams, G)
        per_shard = {s: G // stream.n_shards for s, stream in self.streams.items()}
        indexed = len(self.streams) < len(self.stores)
        while True:
            k = self._consumed // G
            step: dict = {}
            for _ in range(max(1, self.num_workers)):  # the DataLoader takes the workers' items in turn
                step.update(next(items))
            step_src, earlier, _ = plans.row(k)
            idx = None
            if indexed:
                idx = self.pairs(np.arange(k * G + r * BA, k * G + (r + 1) * BA, dtype=np.int64))[1]
            rows = np.empty((BA, T + 1), dtype=np.int64)
            for q, s in enumerate(step_src[r * BA:(r + 1) * BA].tolist()):
                qq = q + r * BA  # offset in the global batch
                if s in per_shard:  # the shard's next windows, in order
                    rows[q] = step[(s, qq // per_shard[s])][0][earlier[qq]]
                else:
                    rows[q] = self.stores[s].read(idx[q] * T, T + 1)
            for j in range(skip, A):
                w = torch.from_numpy(rows[j * B:(j + 1) * B])
                x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
                if pin:
                    x, y = x.pin_memory(), y.pin_memory()
                self._micro = j + 1
                if self._micro == A:  # the step is whole: its end is the new resume point
                    self._consumed, self._micro = self._consumed + G, 0
                    self._stream_pos.update({f"{s}:{v}": pos for (s, v), (_, pos) in step.items()})
                    if self.train:
                        self._announce()
                yield x, y
            skip = 0

    @property
    def samples_consumed(self) -> int:
        return self._consumed + (self._micro // self.grad_accum) * self.global_batch

    def counts(self) -> np.ndarray:
        """Samples each source gave to the global stream so far (all ranks)."""
        return self.schedule.counts_at(self.samples_consumed)

    def metrics(self) -> dict:
        """Per-source accounting for the trainer's log event: tokens consumed and epochs (fractional)."""
        c = self.counts()
        out = {}
        for s, (label, n, size) in enumerate(zip(self.labels, c.tolist(), self.sizes)):
            out[f"data/{label}/tokens"] = n * self.seq_len
            if s not in self.streams:  # a stream's length is unknown: its shards count their own epochs
                out[f"data/{label}/epochs"] = round(n / size, 4) if size else 0.0
        return out

    def _plan_events(self) -> None:
        """Global positions where a source starts its next epoch (or runs out): `_announce` checks one number."""
        c = self.schedule.counts_at(self.samples_consumed).tolist()
        self._events = {}
        for s, (n, size) in enumerate(zip(c, self.sizes)):
            if not size:
                continue
            e = n // size
            last = self.schedule.exhausted_at.get(s)
            if last is not None and last + 1 < self.samples_consumed:
                continue  # ran out before this point (said so then)
            p = self.schedule.position_of(s, (e + 1) * size)
            if p is not None and (last is None or p <= last):
                self._events[s] = (p, "epoch", e + 1)
            elif last is not None:
                self._events[s] = (last + 1, "out", e + 1)
        self._next_event = min((p for p, _, _ in self._events.values()), default=None)

    def _announce(self) -> None:
        """Say when a source starts another pass or has reached its max_epochs (logged once the step holding
        that sample is consumed)."""
        if self._next_event is None or self.samples_consumed <= self._next_event:
            return
        for s, (p, kind, e) in sorted(self._events.items()):
            if p >= self.samples_consumed:
                continue
            if kind == "epoch":
                log.info(f"data.mixture: source {self.labels[s]!r} repeats: starting epoch {e + 1} at sample {p:,}")
            elif self.schedule.end is None:
                log.info(f"data.mixture: source {self.labels[s]!r} reached max_epochs={self.max_epochs[s]} at "
                         f"sample {p:,}; its weight goes to the other sources")
        self._plan_events()

    def describe(self) -> str:
        return ", ".join(f"{l} {w:.3g} ({'stream' if s in self.streams else f'{n:,} windows'}"
                         f"{'' if m is None else f', max_epochs {m}'})"
                         for s, (l, w, n, m) in enumerate(zip(self.labels, self.weights, self.sizes, self.max_epochs)))

    def state_dict(self) -> dict:
        c = self.counts().tolist()
        return {"version": STATE_VERSION, "kind": "mixture", "split": self.split, "labels": list(self.labels),
                "weights": list(map(float, self.weights)), "max_epochs": list(self.max_epochs),
                "segments": [[a, list(map(float, w)), list(map(int, b))] for a, w, b in self.schedule.explicit],
                "samples_consumed": self.samples_consumed, "micro_in_step": self._micro % self.grad_accum,
                "counts": c, "epochs": [n // s if s else 0 for n, s in zip(c, self.sizes)],
                "n_samples": list(self.sizes), "seq_len": self.seq_len, "seed": self.seed,
                "micro_batch_size": self.micro_batch_size, "grad_accum": self.grad_accum, "dp_size": self.dp_size,
                **self._streams_state()}

    def _streams_state(self) -> dict:
        """Streamed sources: shard counts and every shard's position, gathered from all ranks (a collective)."""
        if not self.streams:
            return {}
        pos = dict(self._stream_pos)
        import torch.distributed as dist

        if self.train and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, pos)
            for other in gathered:
                pos.update(other)
        return {"stream_shards": {str(s): src.n_shards for s, src in self.streams.items()}, "stream_positions": pos}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != "mixture" or state.get("version") != STATE_VERSION:
            kind = state.get("kind") if isinstance(state, dict) else type(state).__name__
            raise DataError(f"data-loader state is not a data.mixture state of version {STATE_VERSION} "
                            f"(kind={kind!r}): a checkpoint of a single-source run cannot resume a mixture")
        if state["labels"] != self.labels:
            raise DataError(f"data.mixture sources changed since the checkpoint: saved {state['labels']}, "
                            f"now {self.labels}")
        if (state["n_samples"], state["seq_len"]) != (self.sizes, self.seq_len):
            raise DataError(f"data.mixture state is for {state['n_samples']} windows of seq_len {state['seq_len']}, "
                            f"these sources have {self.sizes} of seq_len {self.seq_len}: different corpus or seq_len")
        check_seed_and_split(state, self)
        consumed = int(state["samples_consumed"])
        saved = MixtureSchedule(state["weights"], self.sizes, state["max_epochs"], self.seed, state["segments"],
                                self.labels)
        changed = (not np.allclose(state["weights"], self.weights, rtol=0, atol=1e-12)
                   or list(state["max_epochs"]) != list(self.max_epochs))
        if changed and not self.reweight_at_resume:
            def fmt(w, m):
                return ", ".join(f"{l}={x:.4g}" + ("" if e is None else f" (max_epochs {e})")
                                 for l, x, e in zip(self.labels, w, m))
            raise DataError(f"data.mixture weights changed since the checkpoint (saved {fmt(state['weights'], state['max_epochs'])}; "
                            f"now {fmt(self.weights, self.max_epochs)}); set data.reweight_at_resume=true to "
                            f"switch at the resume point, or restore the weights")
        if changed:
            if state["micro_in_step"]:
                raise DataError("data.reweight_at_resume needs a checkpoint saved at a step boundary")
            base = saved.counts_at(consumed)
            # every segment before the resume point (those where a source ran out too), then the new weights
            segments = [(a, list(w), list(b)) for a, w, b, _ in saved.segs if a < consumed]
            segments.append((consumed, list(self.weights), base.tolist()))
            self.schedule = MixtureSchedule(self.weights, self.sizes, self.max_epochs, self.seed, segments,
                                            self.labels)
            if self.train:
                log.info(f"data.mixture: reweighted at sample {consumed:,} (data.reweight_at_resume): "
                         f"{self.describe()}")
        else:
            self.schedule = saved
        self._consumed, self._micro = consumed, int(state["micro_in_step"])
        if self.streams:
            if sorted(state.get("stream_shards", {})) != sorted(str(s) for s in self.streams):
                raise DataError("data.mixture state has other streamed (hf) sources than this mixture")
            for s, src in self.streams.items():
                src.n_shards = int(state["stream_shards"][str(s)])  # the saved sharding, whatever auto would pick
                if self.global_batch % src.n_shards:
                    raise DataError(f"the global batch of {self.global_batch} samples must be a multiple of "
                                    f"source {self.labels[s]!r}'s {src.n_shards} stream shards")
            self._stream_pos = {k: dict(v) for k, v in state["stream_positions"].items()}
        self._chunks = {}
        if self.train:
            self._plan_events()


def build_mixture_loader(cfg: DataConfig, tok: Tokenizer, split: str, seq_len: int, micro_batch_size: int,
                         grad_accum: int, dp_rank: int, dp_size: int, seed: int):
    """The `data.mixture` loader of `split`; every source is tokenized (cached) before the first batch."""
    from train.data.cache import ensure_tokens
    from train.data.loader import IndexedLoader

    entries = parse_mixture(cfg)
    if any(e.cfg.source == "hf" for e in entries):
        return _build_with_streams(cfg, entries, tok, split, seq_len, micro_batch_size, grad_accum, dp_rank,
                                   dp_size, seed)
    stores, keep = [], []
    for i, e in enumerate(entries):
        try:
            if e.cfg.source == "tokens":
                if not e.cfg.path:
                    raise DataError("path is required for source: tokens (a dir written by python -m train.prepare)")
                root = e.cfg.path
            else:
                root = ensure_tokens(e.cfg, tok, progress=dp_rank == 0)
            if split == "val":
                from train.data.shards import read_header

                if split not in read_header(Path(root), tok)["splits"] or (
                        e.cfg.source != "tokens" and e.cfg.val_fraction == 0):
                    continue  # no validation split: left out of eval
            stores.append(TokenStore(root, split, tok))
            keep.append(e)
        except DataError as err:
            raise DataError(f"data.mixture[{i}] ({e.label}): {err}") from None
    if split == "val":
        keep_pairs = [(e, st) for e, st in zip(keep, stores)
                      if max(0, st.n_tokens - 1) // seq_len >= micro_batch_size * dp_size]
        if not keep_pairs or sum(e.weight for e, _ in keep_pairs) == 0:
            raise DataError("no source of data.mixture with weight > 0 has a validation split of one eval batch "
                            f"({micro_batch_size * dp_size} windows of seq_len {seq_len}); set train.eval_steps=0")
        keep, stores = [e for e, _ in keep_pairs], [st for _, st in keep_pairs]
        per_source = {e.label: IndexedLoader(st, "val", seq_len, micro_batch_size, 1, dp_rank, dp_size, seed,
                                             False, cfg.num_workers) for e, st in zip(keep, stores)}
        return MixtureLoader(keep, stores, split, seq_len, micro_batch_size, 1, dp_rank, dp_size, seed,
                             cfg.num_workers, sources=per_source)
    loader = MixtureLoader(keep, stores, split, seq_len, micro_batch_size, grad_accum, dp_rank, dp_size, seed,
                           cfg.num_workers, reweight_at_resume=cfg.reweight_at_resume)
    if dp_rank == 0:
        log.info(f"data.mixture: {loader.describe()}")
    return loader


def _indexed_root(e: MixtureEntry, tok: Tokenizer, progress: bool) -> str:
    from train.data.cache import ensure_tokens

    if e.cfg.source == "tokens":
        if not e.cfg.path:
            raise DataError("path is required for source: tokens (a dir written by python -m train.prepare)")
        return e.cfg.path
    return str(ensure_tokens(e.cfg, tok, progress=progress))


def _build_with_streams(cfg: DataConfig, entries: list[MixtureEntry], tok: Tokenizer, split: str, seq_len: int,
                        micro_batch_size: int, grad_accum: int, dp_rank: int, dp_size: int, seed: int):
    """A mixture with streamed (hf) sources: train through `_iter_streams`; val takes the sources' own val
    loaders in turn."""
    from dataclasses import replace

    from train.data.hf import HFStreamLoader, auto_shards, hf_records
    from train.data.loader import IndexedLoader

    G = micro_batch_size * grad_accum * dp_size
    if split == "val":
        per_source = {}
        for i, e in enumerate(entries):
            try:
                if e.cfg.source == "hf":
                    per_source[e.label] = HFStreamLoader(replace(e.cfg, num_workers=cfg.num_workers), tok, "val",
                                                         seq_len, micro_batch_size, 1, dp_rank, dp_size, seed)
                elif e.cfg.source == "tokens" or e.cfg.val_fraction > 0:
                    store = TokenStore(_indexed_root(e, tok, dp_rank == 0), "val", tok)
                    if max(0, store.n_tokens - 1) // seq_len >= micro_batch_size * dp_size:
                        per_source[e.label] = IndexedLoader(store, "val", seq_len, micro_batch_size, 1, dp_rank,
                                                            dp_size, seed, False, cfg.num_workers)
            except DataError as err:
                if "no split" in str(err) and e.cfg.source == "tokens":
                    continue  # a prepared dir without a val split: left out of eval
                raise DataError(f"data.mixture[{i}] ({e.label}): {err}") from None
        return _TakeTurns(per_source)
    stores, streams = [], {}
    for i, e in enumerate(entries):
        try:
            if e.cfg.source == "hf":
                n_shards = e.cfg.stream_shards or auto_shards(G)
                if G % n_shards:
                    raise DataError(f"stream_shards={n_shards} must divide the global batch of {G} samples")
                ds = hf_records(e.cfg, "train", seed + 1000 * (i + 1))
                streams[i] = _StreamSource(ds, e.cfg.text_field, n_shards,
                                           hasattr(ds, "state_dict") and not e.cfg.shuffle)
                stores.append(None)
            else:
                stores.append(TokenStore(_indexed_root(e, tok, dp_rank == 0), "train", tok))
        except DataError as err:
            raise DataError(f"data.mixture[{i}] ({e.label}): {err}") from None
    loader = MixtureLoader(entries, stores, split, seq_len, micro_batch_size, grad_accum, dp_rank, dp_size, seed,
                           cfg.num_workers, reweight_at_resume=cfg.reweight_at_resume, streams=streams, tok=tok)
    if dp_rank == 0:
        log.info(f"data.mixture: {loader.describe()}")
    return loader
