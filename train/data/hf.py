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

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from train.data.config import DataConfig
from train.data.errors import DataError, DataPathNotFoundError
from train.data.tokenizer import Tokenizer

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
_SHUFFLE_BUFFER = 10_000


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


class _PackedStream(IterableDataset):
    """Documents of one (rank, worker) share -> EOT-separated tokens -> (x, y, position) micro-batches.

    The position after each micro-batch (epoch, records read in the epoch, tokens read but not yet
    packed) travels with it, so the main process always holds the exact resume point of every share.
    """

    def __init__(self, ds, tok: Tokenizer, text_field: str, seq_len: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, resume: list[dict | None], rotate: int) -> None:
        self.ds, self.tok, self.text_field = ds, tok, text_field
        self.seq_len, self.B, self.rank, self.world = seq_len, micro_batch_size, dp_rank, dp_size
        self.resume, self.rotate = resume, rotate

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        from datasets.distributed import split_dataset_by_node

        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        # the DataLoader polls worker 0 first: on resume, worker 0 takes the share whose turn is next
        w = (w + self.rotate) % nw
        part = split_dataset_by_node(self.ds, rank=self.rank * nw + w, world_size=self.world * nw)
        T, eot, st = self.seq_len, self.tok.eot_token, self.resume[w]
        epoch, skip = (st["epoch"], st["records"]) if st else (0, 0)
        buf: list[int] = list(st["buf"]) if st else []
        rows: list[list[int]] = []
        while True:
            part.set_epoch(epoch)
            n = 0  # records read in this epoch (the resume point counts records, not tokens)
            # .iter() rather than iter(): datasets would re-split by torch worker a second time
            for batch in part.iter(batch_size=64):
                recs = batch[self.text_field]
                first, n = n, n + len(recs)
                if n <= skip:  # already packed before the resume point: read, not tokenized
                    continue
                recs = recs[max(0, skip - first):]
                texts = [t if isinstance(t, str) else "" for t in recs]
                for k, ids in enumerate(self.tok.encode_batch(texts)):
                    if not texts[k]:
                        continue
                    buf.extend(ids)
                    buf.append(eot)
                    while len(buf) >= T + 1:
                        rows.append(buf[:T + 1])
                        del buf[:T]  # stride T: a window's last target is the next window's first input
                        if len(rows) == self.B:
                            win = torch.tensor(rows, dtype=torch.long)  # [B, T+1]
                            pos = {"share": w, "epoch": epoch, "records": n - len(recs) + k + 1, "buf": list(buf)}
                            yield win[:, :-1].contiguous(), win[:, 1:].contiguous(), pos
                            rows = []
            if n == 0:
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
                               rotate=self._micro % len(self._shares))
        # an own generator: creating the workers never draws from torch's global RNG
        gen = torch.Generator().manual_seed(self.seed)
        for x, y, pos in DataLoader(stream, batch_size=None, num_workers=self.num_workers, generator=gen):
            self._micro += 1
            self._shares[pos["share"]] = pos
            yield x, y

    def state_dict(self) -> dict:
        return {"version": 2, "kind": "hf", "split": self.split, "micro_yielded": self._micro,
                "shares": [dict(p) if p else None for p in self._shares],
                "dp_size": self.dp_size, "num_workers": self.num_workers, "seq_len": self.seq_len,
                "micro_batch_size": self.micro_batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != "hf" or state.get("version") != 2:
            raise DataError("data-loader state is not an hf-stream state of version 2")
        mine = {k: getattr(self, k) for k in ("dp_size", "num_workers", "seq_len", "micro_batch_size", "seed")}
        theirs = {k: state.get(k) for k in mine}
        if mine != theirs:
            raise DataError(f"an hf-stream position resumes only with the same {sorted(mine)}: "
                            f"saved {theirs}, now {mine}")
        self._micro = int(state["micro_yielded"])
        self._shares = [dict(p) if p else None for p in state["shares"]]
