"""`data.source=hf`: documents streamed from `datasets`, tokenized and packed inside DataLoader workers.

A stream has no random access, so the order is built from a fixed number of stream shards V
(`data.stream_shards`, 0 = auto: the largest divisor of the global batch up to 32). Shard v is
`datasets.distributed.split_dataset_by_node(ds, rank=v, world_size=V)` (whole files when their number
divides V, else every V-th record) and packs its own documents into windows. The global batch of
optimizer step k is, for v = 0 .. V-1, the next G / V windows of shard v (G = micro_batch_size x
grad_accum x dp_size), and rank r takes the slice [r*G/dp, (r+1)*G/dp) of that list. So the samples of
every step depend on G and V only, not on the world size or the worker count: a rank packs only the
shards its slice covers, its workers split those shards, and the main process reassembles each step.

The state is the position of every shard at the last step boundary: (epoch, records read, token offset
into the next record), gathered from all ranks, so a checkpoint resumes on any world size and worker
count. A resume re-reads (without tokenizing) a shard's records up to that point, in the same seeded
order. Train loops over the stream forever (reshuffled per epoch when data.shuffle); val is packed by
every rank from one shard and cycles too, so ranks never run out at different times.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from train.data.config import DataConfig
from train.data.errors import DataError, DataPathNotFoundError
from train.data.shards import token_dtype
from train.data.tokenizer import Tokenizer

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
_SHUFFLE_BUFFER = 10_000
# 4: the positions of the V stream shards at a step boundary (layout-free); 2 and 3 were per (rank, worker)
STATE_VERSION = 4
_GROUP_CHARS = 1 << 20  # characters per tokenizer call: all threads busy, a short wait for the first batch
_MIN_GROUP_CHARS = 1 << 16  # per shard, when a worker packs many shards
MAX_AUTO_SHARDS = 32
_READ_BATCH = 64  # records per datasets read (and between two saved dataset states)


def _load(cfg: DataConfig, split_name: str):
    import datasets

    if cfg.name:
        kwargs = {"data_files": cfg.path} if cfg.path else {}
        try:
            return datasets.load_dataset(cfg.name, cfg.subset, split=split_name, streaming=cfg.streaming, **kwargs)
        except (FileNotFoundError, ValueError, ConnectionError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"cannot load hf dataset data.name={cfg.name!r} split={split_name!r}: {first}") from None
    if not cfg.path:
        raise DataError("data.source=hf needs data.name (Hub name or builder) or data.path (local dataset)")
    p = Path(os.path.expanduser(cfg.path))
    if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "dataset_info.json").is_file()):
        ds = datasets.load_from_disk(str(p))  # a save_to_disk directory
        if isinstance(ds, datasets.DatasetDict):
            if split_name not in ds:
                raise DataError(f"hf dataset {cfg.path!r} has no split {split_name!r} (splits: {sorted(ds)})")
            ds = ds[split_name]
        return ds.to_iterable_dataset(num_shards=min(64, max(1, len(ds)))) if cfg.streaming else ds
    import glob

    if p.is_dir():
        src = str(p)
        builder_kwargs = {}
    elif p.is_file() or glob.glob(str(p)):
        suffix = Path(glob.glob(str(p))[0]).suffix if not p.is_file() else p.suffix
        if suffix not in _BUILDERS:
            raise DataError(f"data.path {cfg.path!r}: file type {suffix!r} unsupported; allowed: {sorted(_BUILDERS)}")
        src, builder_kwargs = _BUILDERS[suffix], {"data_files": {"train": str(p)}}
    else:
        raise DataPathNotFoundError(f"data.path {cfg.path!r} does not exist")
    try:
        return datasets.load_dataset(src, split=split_name, streaming=cfg.streaming, **builder_kwargs)
    except (FileNotFoundError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load hf dataset from data.path={cfg.path!r} split={split_name!r}: {first}") from None


def hf_records(cfg: DataConfig, split: str, seed: int):
    """The `datasets` stream of `split` ("train" | "val"): val is `val_split` or the first `val_docs`."""
    if cfg.val_split:
        ds = _load(cfg, cfg.split if split == "train" else cfg.val_split)
    else:
        if cfg.val_docs < 1:
            raise DataError(f"data.val_docs must be >= 1 when data.val_split is unset, got {cfg.val_docs}")
        ds = _load(cfg, cfg.split)
        ds = ds.skip(cfg.val_docs) if split == "train" else ds.take(cfg.val_docs)
    if not hasattr(ds, "set_epoch"):  # a map-style Dataset (streaming=False)
        ds = ds.to_iterable_dataset(num_shards=min(64, max(1, len(ds))))
    first = next(iter(ds), None)
    if first is None:
        raise DataError(f"hf dataset {cfg.name or cfg.path!r} has no documents in its {split} split")
    if cfg.text_field not in first:
        raise DataError(f"hf dataset {cfg.name or cfg.path!r} has no field {cfg.text_field!r} "
                        f"(fields found: {sorted(first)}); set data.text_field")
    if cfg.shuffle and split == "train":
        ds = ds.shuffle(seed=seed, buffer_size=_SHUFFLE_BUFFER)
    return ds


def hf_documents(cfg: DataConfig, split: str, seed: int = 0) -> Iterator[str]:
    """Texts of the stream in order (used by `train.prepare`)."""
    for rec in hf_records(cfg, split, seed):
        text = rec.get(cfg.text_field)
        if isinstance(text, str) and text:
            yield text


def _as_is(sample):
    """DataLoader collate for ready items: no recursive conversion of the position dicts."""
    return sample


def _threads_per_worker(num_workers: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cores // max(1, num_workers)))


def auto_shards(global_batch: int, most: int = MAX_AUTO_SHARDS) -> int:
    """data.stream_shards=0: the largest divisor of the global batch that is at most `most`."""
    return max(d for d in range(1, min(most, global_batch) + 1) if global_batch % d == 0)


class _Packer:
    """Documents of one stream shard -> EOT-separated tokens -> chunks of `n` windows [n, T+1] at stride T.

    Records are read and tokenized in groups (tiktoken's batch encoder, threads without the GIL) and packed
    with numpy. After each chunk, the position names where the next window starts: (epoch, records before
    the record holding that token, offset into that record's tokens + EOT). A packer started at a position
    re-reads (without tokenizing) the records before it, in the same seeded order, so it continues exactly.
    An unshuffled stream also carries the dataset's own `state_dict()` at the last read batch (_READ_BATCH records) before
    that record: a resume loads it and re-reads fewer than _READ_BATCH records (a shuffle buffer's content is not in
    that state, so a shuffled stream re-reads its records instead: slower, but exact).
    """

    def __init__(self, make_part, tok: Tokenizer, text_field: str, seq_len: int, n: int, start: dict | None,
                 threads: int, group_chars: int, where: str, ds_state: bool) -> None:
        self.make_part, self.tok, self.text_field, self.T, self.n = make_part, tok, text_field, seq_len, n
        self.start, self.threads, self.group_chars, self.where = start, threads, group_chars, where
        self.ds_state = ds_state  # use the dataset's state_dict() / load_state_dict()
        # (epoch, records before a batch boundary, the dataset's state there)
        self._marks: list[tuple[int, int, dict]] = []

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        """Token arrays of `texts` (+ EOT each; empty texts give an empty array)."""
        from train.data.shards import _PIECE_CHARS, split_for_tokenizing

        eot = np.array([self.tok.eot_token], dtype=np.int64)
        splittable = self.tok.splits_at_lines  # long texts in pieces: all threads busy, same tokens
        pieces, owner = [], []
        for k, t in enumerate(texts):
            for piece in (split_for_tokenizing(t, _PIECE_CHARS) if splittable and t else [t] if t else []):
                pieces.append(piece)
                owner.append(k)
        parts: list[list[np.ndarray]] = [[] for _ in texts]
        for k, ids in zip(owner, self.tok.encode_batch(pieces, num_threads=self.threads)):
            parts[k].append(np.array(ids, dtype=np.int64))
        return [np.concatenate([*ps, eot]) if ps else eot[:0] for ps in parts]

    def _groups(self, part, skip: int, i: int = 0) -> Iterator[tuple[int, list[str]]]:
        """(index of the first record, texts) of about group_chars characters, from record `skip` on; the
        records before it are read, not tokenized (the resume point counts records). `i`: the record the
        dataset starts at (after load_state_dict)."""
        texts, size, first = [], 0, skip
        # .iter() rather than iter(): datasets would re-split by torch worker a second time
        for batch in part.iter(batch_size=_READ_BATCH):
            recs = batch[self.text_field]
            lo, i = max(0, skip - i), i + len(recs)
            if self.ds_state:  # state_dict() is a copy already
                self._marks.append((self._epoch, i, part.state_dict()))
            for t in recs[lo:]:
                texts.append(t if isinstance(t, str) else "")
                size += len(texts[-1])
                if size >= self.group_chars:
                    yield first, texts
                    first, texts, size = first + len(texts), [], 0
        if texts:
            yield first, texts

    def _position(self, epoch: int, record: int, offset: int) -> dict:
        pos = {"epoch": epoch, "records": record, "offset": offset}
        marks = self._marks
        if self.ds_state and marks and marks[0][0] == epoch:  # the dataset's state at the last batch boundary
            while len(marks) > 1 and marks[1][0] == epoch and marks[1][1] <= record:  # at or before `record`
                marks.pop(0)
            if marks[0][1] <= record:
                pos["ds_records"], pos["ds_state"] = marks[0][1], marks[0][2]
        return pos

    def __iter__(self) -> Iterator[tuple[np.ndarray, dict]]:
        T, n, st = self.T, self.n, self.start
        epoch, skip, drop = (st["epoch"], st["records"], st["offset"]) if st else (0, 0, 0)
        # pending tokens and where each segment of them comes from: (start in buf, epoch, record, offset)
        buf, segs = np.zeros(0, np.int64), []
        idx = np.arange(T + 1)[None, :] + (np.arange(n) * T)[:, None]  # window k of a chunk: [n, T+1]
        part = self.make_part()  # one split per shard: a loaded state applies to its own epoch only (datasets)
        while True:
            at = 0
            part.set_epoch(epoch)
            if self.ds_state and st and st.get("ds_state") is not None and st["epoch"] == epoch:
                part.load_state_dict(st["ds_state"])  # jump to the batch boundary: re-read < _READ_BATCH records
                at = st["ds_records"]
            self._epoch, self._marks = epoch, [(epoch, at, st["ds_state"])] if at else []
            got = False
            for first, texts in self._groups(part, skip, at):
                got = True
                toks = self._encode(texts)
                offsets = [0] * len(toks)
                if first == skip and drop:  # the record holding the resume point
                    toks[0], offsets[0], drop = toks[0][drop:], drop, 0
                starts = len(buf) + np.cumsum([0] + [len(a) for a in toks[:-1]])
                segs += [(int(s0), epoch, first + k, off) for k, (s0, off) in enumerate(zip(starts, offsets))]
                buf = np.concatenate([buf, *toks])
                n_chunks = (len(buf) - 1) // (T * n)
                if not n_chunks:
                    continue
                seg_starts = np.array([s[0] for s in segs])
                for m in range(n_chunks):
                    nxt = (m + 1) * n * T  # the next window's first token (the last target of this one)
                    j = int(np.searchsorted(seg_starts, nxt, side="right")) - 1
                    s0, e, r, off = segs[j]
                    yield buf[idx + m * n * T], self._position(e, r, off + nxt - s0)
                cut = n_chunks * n * T
                j = int(np.searchsorted(seg_starts, cut, side="right")) - 1
                s0, e, r, off = segs[j]
                segs = [(0, e, r, off + cut - s0)] + [(x - cut, *rest) for x, *rest in segs[j + 1:]]
                buf = buf[cut:].copy()
            if not got and not skip:
                raise DataError(f"hf stream: {self.where} got no documents (the stream has fewer records than "
                                f"shards); lower data.stream_shards or use a longer stream")
            epoch, skip, st = epoch + 1, 0, None


class _StepStream(IterableDataset):
    """One item per optimizer step and DataLoader worker: {shard: (windows [n, T+1], position after them)}
    for the stream shards this worker packs (shards[w::num_workers] of the rank's shards)."""

    def __init__(self, ds, tok: Tokenizer, text_field: str, seq_len: int, n_shards: int, per_shard: int,
                 shards: list[int], resume: dict[int, dict | None], threads: int, ds_state: bool) -> None:
        self.ds, self.tok, self.text_field, self.seq_len = ds, tok, text_field, seq_len
        self.n_shards, self.per_shard, self.shards, self.resume = n_shards, per_shard, shards, resume
        self.threads, self.ds_state = threads, ds_state
        # windows cross the worker pipe as one compact array (pickled inline); the main process splits them
        self.wire_dtype = np.dtype(token_dtype(tok.n_vocab))

    def __iter__(self) -> Iterator[dict[int, tuple[np.ndarray, dict]]]:
        from datasets.distributed import split_dataset_by_node

        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        mine = self.shards[w::nw]
        group = max(_MIN_GROUP_CHARS, _GROUP_CHARS // max(1, len(mine)))
        def part_of(v: int):
            return lambda: split_dataset_by_node(self.ds, rank=v, world_size=self.n_shards)

        packers = {v: iter(_Packer(part_of(v), self.tok, self.text_field, self.seq_len, self.per_shard,
                                   self.resume.get(v), self.threads, group, f"shard {v} of {self.n_shards}",
                                   self.ds_state))
                   for v in mine}
        while True:
            item = {}
            for v, it in packers.items():
                win, pos = next(it)
                item[v] = (win.astype(self.wire_dtype), pos)
            yield item


class HFStreamLoader:
    """Loader of `data.source=hf`; same iteration / state interface as the indexed loader.

    train and val both loop over their stream forever; val restarts at every `iter()`.
    """

    def __init__(self, cfg: DataConfig, tok: Tokenizer, split: str, seq_len: int, micro_batch_size: int,
                 grad_accum: int, dp_rank: int, dp_size: int, seed: int) -> None:
        self.cfg, self.tok, self.split, self.seed = cfg, tok, split, seed
        self.seq_len, self.micro_batch_size, self.grad_accum = seq_len, micro_batch_size, grad_accum
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, cfg.num_workers
        self.global_batch = micro_batch_size * grad_accum * dp_size
        if cfg.stream_shards < 0:
            raise DataError(f"data.stream_shards={cfg.stream_shards} must be >= 0 (0 = auto)")
        if split == "val":  # a short stream: every rank packs all of it (val_docs may be fewer than shards)
            self.n_shards = 1
        elif cfg.stream_shards:
            self.n_shards = cfg.stream_shards
        else:
            self.n_shards = auto_shards(self.global_batch)
        self._check_shards()
        self.ds = hf_records(cfg, split, seed)  # validates name / path / field before any worker starts
        # the dataset's own resume state, where it has one and no shuffle buffer would be lost by it
        self.ds_state = hasattr(self.ds, "state_dict") and not (cfg.shuffle and split == "train")
        self._reset()

    def _check_shards(self) -> None:
        if self.global_batch % self.n_shards:
            raise DataError(f"the global batch of {self.global_batch} samples (micro_batch_size x grad_accum x "
                            f"dp_size) must be a multiple of the hf stream's {self.n_shards} shards "
                            f"(data.stream_shards)")

    @property
    def per_shard(self) -> int:
        return self.global_batch // self.n_shards

    def _reset(self) -> None:
        self._steps = 0  # optimizer steps (global batches) consumed
        self._micro = 0  # micro-batches yielded inside the current step
        self._pos: dict[int, dict | None] = {}  # shard -> position at the last step boundary

    def _my_positions(self) -> list[tuple[int, int]]:
        """(shard, window) of every sample of this rank in one global batch, in order."""
        BA = self.micro_batch_size * self.grad_accum
        return [divmod(q, self.per_shard) for q in range(self.dp_rank * BA, (self.dp_rank + 1) * BA)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.split == "val":
            self._reset()
        wanted = self._my_positions()
        shards = sorted({v for v, _ in wanted})
        stream = _StepStream(self.ds, self.tok, self.cfg.text_field, self.seq_len, self.n_shards, self.per_shard,
                             shards, dict(self._pos), threads=_threads_per_worker(self.num_workers),
                             ds_state=self.ds_state)
        gen = torch.Generator().manual_seed(self.seed)  # creating the workers never draws from torch's global RNG
        dl = DataLoader(stream, batch_size=None, num_workers=self.num_workers, generator=gen, collate_fn=_as_is,
                        prefetch_factor=self._prefetch() if self.num_workers else None)
        pin = torch.cuda.is_available()
        B, A = self.micro_batch_size, self.grad_accum
        items = iter(dl)
        skip = self._micro
        while True:
            step: dict[int, tuple[np.ndarray, dict]] = {}
            for _ in range(max(1, self.num_workers)):  # the DataLoader takes the workers' items in turn
                step.update(next(items))
            rows = np.stack([step[v][0][j] for v, j in wanted]).astype(np.int64)  # [B * A, T + 1]
            for j in range(skip, A):
                w = torch.from_numpy(rows[j * B:(j + 1) * B])
                x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
                if pin:  # the trainer copies with non_blocking
                    x, y = x.pin_memory(), y.pin_memory()
                self._micro = j + 1
                if self._micro == A:  # the step is whole: its end is the new resume point
                    self._steps, self._micro = self._steps + 1, 0
                    self._pos.update({v: pos for v, (_, pos) in step.items()})
                yield x, y
            skip = 0

    def _prefetch(self) -> int:
        """Steps each worker may run ahead: about one tokenizer group's worth (~4 characters a token)."""
        per_worker = self.per_shard * self.seq_len * 4 * max(1, -(-len(self._my_positions()) // self.per_shard))
        return max(2, min(16, -(-_GROUP_CHARS // max(1, per_worker)) + 1))

    def state_dict(self) -> dict:
        """The position of every stream shard at the last step boundary (gathered from all ranks when
        distributed, so any rank's state resumes any layout) + the micro-batches into the current step."""
        pos = dict(self._pos)
        import torch.distributed as dist

        if self.split == "train" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, pos)
            for other in gathered:
                pos.update(other)
        return {"version": STATE_VERSION, "kind": "hf", "split": self.split, "steps": self._steps,
                "micro_in_step": self._micro, "shards": self.n_shards,
                "positions": [pos.get(v) for v in range(self.n_shards)], "global_batch": self.global_batch,
                "micro_batch_size": self.micro_batch_size, "grad_accum": self.grad_accum, "dp_size": self.dp_size,
                "num_workers": self.num_workers, "seq_len": self.seq_len, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != "hf":
            raise DataError("data-loader state is not an hf-stream state")
        if state.get("version") != STATE_VERSION:
            raise DataError(f"hf-stream state version {state.get('version')} was saved by an older lmforge whose "
                            f"stream order depended on the layout; it cannot resume exactly (supported: "
                            f"{STATE_VERSION}); start a new run")
        for k in ("seq_len", "seed"):
            if state[k] != getattr(self, k):
                raise DataError(f"hf-stream state has {k}={state[k]}, this run {k}={getattr(self, k)}; "
                                f"it resumes only with the same {k}")
        if state["micro_in_step"] and any(state[k] != getattr(self, k) for k in
                                          ("micro_batch_size", "grad_accum", "dp_size")):
            raise DataError("data-loader state was saved inside an optimizer step; it resumes only with the same "
                            "micro_batch_size, grad_accum and dp_size (save at a step boundary)")
        if self.split == "train":
            self.n_shards = int(state["shards"])  # the saved stream's sharding, whatever this run would pick
            self._check_shards()
        self._steps, self._micro = int(state["steps"]), int(state["micro_in_step"])
        self._pos = {v: dict(p) for v, p in enumerate(state["positions"]) if p is not None}
