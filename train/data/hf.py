"""`data.source=hf`: documents streamed from `datasets`, tokenized and packed inside DataLoader workers.

Unlike the indexed sources, a stream has no global sample index: the documents are divided over
(rank, worker) pairs with `datasets.distributed.split_dataset_by_node` (whole shards when their number
divides dp_size * num_workers, else every (dp_size * num_workers)-th record), and each pair packs its
own documents. The sample order therefore depends on dp_size and num_workers, and a resume must keep
both. The state holds, per worker share, the epoch, the records read and the tokens not yet packed:
a resume re-reads (without tokenizing) the records before that point, in the same seeded order.
Train loops over the stream forever (reshuffled per epoch when data.shuffle); val cycles too, so
ranks never run out at different times: evaluate a fixed number of batches.
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
# 3: a share's position is (epoch, record, token offset in it); 2 saved (records consumed, unpacked tokens)
STATE_VERSION = 3
_GROUP_CHARS = 1 << 20  # characters per tokenizer call: all threads busy, a short wait for the first batch


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
    """DataLoader collate for ready micro-batches: no recursive conversion of the position dict."""
    return sample


def _threads_per_worker(num_workers: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cores // max(1, num_workers)))


class _PackedStream(IterableDataset):
    """Documents of one (rank, worker) share -> EOT-separated tokens -> (x, y, position) micro-batches.

    Records are read and tokenized in groups (tiktoken's batch encoder, threads without the GIL) and
    packed with numpy: the tokens of a group plus the carry-over of the previous one form one array,
    and every full micro-batch is a single gather of [B, T+1] windows at stride T.

    The position after each micro-batch names where the next window starts: (epoch, records before
    the record holding that token, offset into that record's tokens + EOT); `buf` holds tokens that
    precede that record (only ever from a version-2 state, which saved the unpacked tokens). It travels
    with the batch, so the main process always holds the exact resume point of every share.
    """

    def __init__(self, ds, tok: Tokenizer, text_field: str, seq_len: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, resume: list[dict | None], rotate: int, threads: int = 1) -> None:
        self.ds, self.tok, self.text_field = ds, tok, text_field
        self.seq_len, self.B, self.rank, self.world = seq_len, micro_batch_size, dp_rank, dp_size
        self.resume, self.rotate, self.threads = resume, rotate, threads
        # windows cross the worker pipe as one compact array (pickled inline: cheaper than two int64
        # tensors in shared memory); the main process splits it into (x, y)
        self.wire_dtype = np.dtype(token_dtype(tok.n_vocab))

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

    def _groups(self, part, skip: int) -> Iterator[tuple[int, list[str]]]:
        """(epoch index of the first record, texts) of about _GROUP_CHARS characters, from record `skip`
        on; the records before it are read, not tokenized (the resume point counts records)."""
        texts, size, first, i = [], 0, skip, 0
        # .iter() rather than iter(): datasets would re-split by torch worker a second time
        for batch in part.iter(batch_size=64):
            recs = batch[self.text_field]
            lo, i = max(0, skip - i), i + len(recs)
            for t in recs[lo:]:
                texts.append(t if isinstance(t, str) else "")
                size += len(texts[-1])
                if size >= _GROUP_CHARS:
                    yield first, texts
                    first, texts, size = first + len(texts), [], 0
        if texts:
            yield first, texts

    def __iter__(self) -> Iterator[tuple[np.ndarray, dict]]:
        from datasets.distributed import split_dataset_by_node

        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        # the DataLoader polls worker 0 first: on resume, worker 0 takes the share whose turn is next
        w = (w + self.rotate) % nw
        part = split_dataset_by_node(self.ds, rank=self.rank * nw + w, world_size=self.world * nw)
        T, B, st = self.seq_len, self.B, self.resume[w]
        epoch, skip = (st["epoch"], st["records"]) if st else (0, 0)
        drop = st.get("offset", 0) if st else 0  # tokens of record `skip` before the resume point
        # pending tokens and where each segment of them comes from: (start in buf, epoch, record, offset)
        # record None = tokens saved by a version-2 state, which precede record `skip`
        legacy = np.asarray(st.get("buf") or [], dtype=np.int64) if st else np.zeros(0, np.int64)
        legacy_records = skip
        buf, segs = legacy, [(0, epoch, None, 0)]
        idx = np.arange(T + 1)[None, :] + (np.arange(B) * T)[:, None]  # window k of a micro-batch: [B, T+1]
        while True:
            part.set_epoch(epoch)
            got = False
            for first, texts in self._groups(part, skip):
                got = True
                toks = self._encode(texts)
                offsets = [0] * len(toks)
                if first == skip and drop:  # the record holding the resume point
                    toks[0], offsets[0], drop = toks[0][drop:], drop, 0
                starts = len(buf) + np.cumsum([0] + [len(a) for a in toks[:-1]])
                segs += [(int(s0), epoch, first + k, off) for k, (s0, off) in enumerate(zip(starts, offsets))]
                buf = np.concatenate([buf, *toks])
                n_micro = (len(buf) - 1) // (T * B)
                if not n_micro:
                    continue
                seg_starts = np.array([s[0] for s in segs])
                for m in range(n_micro):
                    win = buf[idx + m * B * T]  # [B, T+1]
                    nxt = (m + 1) * B * T  # the next window's first token (the last target of this one)
                    j = int(np.searchsorted(seg_starts, nxt, side="right")) - 1
                    s0, e, r, off = segs[j]
                    if r is None:  # still inside a version-2 carry
                        pos = {"share": w, "epoch": e, "records": legacy_records, "offset": 0,
                               "buf": buf[nxt:len(legacy)].tolist()}
                    else:
                        pos = {"share": w, "epoch": e, "records": r, "offset": off + nxt - s0, "buf": []}
                    yield win.astype(self.wire_dtype), pos
                cut = n_micro * B * T
                j = int(np.searchsorted(seg_starts, cut, side="right")) - 1
                s0, e, r, off = segs[j]
                if r is None:
                    legacy = legacy[cut:]
                    segs = [(0, e, None, 0)] + [(x - cut, *rest) for x, *rest in segs[j + 1:]]
                else:
                    segs = [(0, e, r, off + cut - s0)] + [(x - cut, *rest) for x, *rest in segs[j + 1:]]
                buf = buf[cut:].copy()
            if not got and not skip:
                raise DataError(f"hf stream: rank {self.rank} worker {w} got no documents (the stream has fewer "
                                f"records than dp_size * num_workers = {self.world * nw})")
            epoch, skip = epoch + 1, 0


class HFStreamLoader:
    """Loader of `data.source=hf`; same iteration / state interface as the indexed loader.

    train and val both loop over their stream forever; val restarts at every `iter()`.
    """

    def __init__(self, cfg: DataConfig, tok: Tokenizer, split: str, seq_len: int, micro_batch_size: int,
                 grad_accum: int, dp_rank: int, dp_size: int, seed: int) -> None:
        self.cfg, self.tok, self.split, self.seed = cfg, tok, split, seed
        self.seq_len, self.micro_batch_size, self.grad_accum = seq_len, micro_batch_size, grad_accum
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, cfg.num_workers
        self.ds = hf_records(cfg, split, seed)  # validates name / path / field before any worker starts
        self._reset()

    def _reset(self) -> None:
        self._micro = 0  # micro-batches this rank yielded
        self._shares: list[dict | None] = [None] * max(1, self.num_workers)  # position of each worker's share

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.split == "val":
            self._reset()
        stream = _PackedStream(self.ds, self.tok, self.cfg.text_field, self.seq_len, self.micro_batch_size,
                               self.dp_rank, self.dp_size, resume=list(self._shares),
                               rotate=self._micro % len(self._shares), threads=_threads_per_worker(self.num_workers))
        # an own generator: creating the workers never draws from torch's global RNG
        gen = torch.Generator().manual_seed(self.seed)
        dl = DataLoader(stream, batch_size=None, num_workers=self.num_workers, generator=gen, collate_fn=_as_is,
                        prefetch_factor=self._prefetch() if self.num_workers else None)
        pin = torch.cuda.is_available()
        for win, pos in dl:
            self._micro += 1
            self._shares[pos["share"]] = pos
            w = torch.from_numpy(win.astype(np.int64))  # [B, T+1]
            x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
            if pin:  # the trainer copies with non_blocking
                x, y = x.pin_memory(), y.pin_memory()
            yield x, y

    def _prefetch(self) -> int:
        """Micro-batches each worker may run ahead: about one tokenizer group's worth (~4 characters a
        token), so a worker tokenizes its next group while the DataLoader takes the others' turns."""
        return max(2, min(64, -(-_GROUP_CHARS // (4 * self.seq_len * self.micro_batch_size)) + 1))

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "kind": "hf", "split": self.split, "micro_yielded": self._micro,
                "shares": [dict(p) if p else None for p in self._shares],
                "dp_size": self.dp_size, "num_workers": self.num_workers, "seq_len": self.seq_len,
                "micro_batch_size": self.micro_batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != "hf" or state.get("version") not in (2, STATE_VERSION):
            raise DataError(f"data-loader state is not an hf-stream state of version 2 or {STATE_VERSION}")
        mine = {k: getattr(self, k) for k in ("dp_size", "num_workers", "seq_len", "micro_batch_size", "seed")}
        theirs = {k: state.get(k) for k in mine}
        if mine != theirs:
            raise DataError(f"an hf-stream position resumes only with the same {sorted(mine)}: "
                            f"saved {theirs}, now {mine}")
        self._micro = int(state["micro_yielded"])
        self._shares = [dict(p) if p else None for p in state["shares"]]
