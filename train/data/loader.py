"""`build_dataloader`: (x, y) micro-batches for one data-parallel rank, resumable by `state_dict()`.

Indexed sources (shakespeare, text, tokens) see a corpus split as one token stream; sample i is the
window tokens[i*T : i*T + T + 1] (x = w[:-1], y = w[1:]). Positions 0, 1, 2, ... of an endless
sample order map to sample indices through a per-epoch permutation seeded by (seed, epoch). The
global batch of optimizer step k is positions [k*G, (k+1)*G) with G = micro_batch_size * grad_accum *
dp_size; within it rank r takes the contiguous slice [r*B*A, (r+1)*B*A), micro-step j the j-th B of
that slice. So the set of samples of a step depends only on G (not on how it is split into ranks,
micro-batches or workers), ranks are disjoint, and the state (samples consumed) is world-size free.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from train.data.cache import ensure_tokens
from train.data.config import SOURCES, DataConfig
from train.data.errors import DataError
from train.data.shards import TokenStore
from train.data.tokenizer import Tokenizer

STATE_VERSION = 1


def check_seed_and_split(state: dict, loader) -> None:
    """A saved loader state resumes only with its seed, and, when saved inside an optimizer step, with the same
    micro_batch_size, grad_accum and dp_size (``loader`` has those attributes)."""
    if state["seed"] != loader.seed:
        raise DataError(f"data-loader state was made with seed {state['seed']}, this loader has seed {loader.seed}")
    same_split = all(state[k] == getattr(loader, k) for k in ("micro_batch_size", "grad_accum", "dp_size"))
    if state["micro_in_step"] and not same_split:
        raise DataError("data-loader state was saved inside an optimizer step; it resumes only with the same "
                        "micro_batch_size, grad_accum and dp_size (save at a step boundary)")


class SampleOrder:
    """Position in the endless training order -> sample index (epoch-wise seeded permutations)."""

    def __init__(self, n_samples: int, seed: int, shuffle: bool) -> None:
        self.n, self.seed, self.shuffle = n_samples, seed, shuffle
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def indices(self, positions: np.ndarray) -> np.ndarray:
        if not self.shuffle:
            return positions % self.n
        epochs, offs = np.divmod(positions, self.n)
        out = np.empty_like(positions)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[offs[sel]]
        return out


class _Windows(Dataset):
    """Batched map-style dataset: a list of sample indices -> (x, y) LongTensors [B, T]."""

    def __init__(self, store: TokenStore, seq_len: int) -> None:
        self.store, self.seq_len = store, seq_len

    def __len__(self) -> int:
        return max(0, self.store.n_tokens - 1) // self.seq_len

    def __getitem__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        w = torch.from_numpy(np.stack([self.store.read(int(i) * T, T + 1) for i in idx]))  # [B, T+1]
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class _MicroBatches(Sampler):
    """This rank's micro-batches of sample indices, starting at a global position."""

    def __init__(self, loader: IndexedLoader, start: int, skip_micro: int) -> None:
        self.l, self.start, self.skip = loader, start, skip_micro

    def __iter__(self) -> Iterator[list[int]]:
        l = self.l
        B, A, r = l.micro_batch_size, l.grad_accum, l.dp_rank
        step, j = divmod(self.skip, A)
        while l.train or step < l.val_steps:
            if l.train:  # rank r's slice of the global batch, micro-step j
                first = self.start + step * l.global_batch + r * B * A + j * B
            else:  # val: in order, global unit B * dp_size, no accumulation
                first = step * B * l.dp_size + r * B
            yield l.order.indices(np.arange(first, first + B, dtype=np.int64)).tolist()
            j += 1
            if j == A or not l.train:
                step, j = step + 1, 0


class IndexedLoader:
    """Loader of an indexed source; iterate for (x, y) [B, T] micro-batches in step-major order.

    train: endless; each `iter()` continues from the current position. val: one ordered pass over the
    split (whole units of micro_batch_size * dp_size windows), restarting at every `iter()`.
    """

    def __init__(self, store: TokenStore, split: str, seq_len: int, micro_batch_size: int, grad_accum: int,
                 dp_rank: int, dp_size: int, seed: int, shuffle: bool, num_workers: int) -> None:
        self.store, self.split, self.train = store, split, split == "train"
        self.seq_len, self.micro_batch_size, self.grad_accum = seq_len, micro_batch_size, grad_accum
        self.dp_rank, self.dp_size, self.seed, self.num_workers = dp_rank, dp_size, seed, num_workers
        self.dataset = _Windows(store, seq_len)
        self.n_samples = len(self.dataset)
        self.global_batch = micro_batch_size * grad_accum * dp_size
        need = self.global_batch if self.train else micro_batch_size * dp_size
        if self.n_samples < need:
            raise DataError(
                f"the {split} split of {store.describe()} has {store.n_tokens} tokens = {self.n_samples} windows "
                f"of seq_len {seq_len}; "
                f"one {'global batch' if self.train else 'eval batch over all ranks'} needs {need} windows "
                f"({need * seq_len + 1} tokens): use more data or a smaller seq_len / batch")
        self.val_steps = self.n_samples // (micro_batch_size * dp_size)
        self.order = SampleOrder(self.n_samples, seed, shuffle and self.train)
        self._consumed = 0  # global positions consumed up to the current step boundary
        self._micro = 0     # micro-batches this rank yielded since then

    def __len__(self) -> int:
        if self.train:
            raise TypeError("the train loader is endless")
        return self.val_steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.train:
            self._consumed, self._micro = 0, 0
        sampler = _MicroBatches(self, self._consumed, self._micro)
        # an own generator: creating the workers never draws from torch's global RNG
        gen = torch.Generator().manual_seed(self.seed)
        dl = DataLoader(self.dataset, sampler=sampler, batch_size=None, num_workers=self.num_workers, generator=gen,
                        pin_memory=torch.cuda.is_available())  # pinned: the trainer copies with non_blocking
        for xy in dl:
            self._micro += 1
            yield xy

    @property
    def samples_consumed(self) -> int:
        return self._consumed + (self._micro // self.grad_accum) * self.global_batch

    def state_dict(self) -> dict:
        """Position after the last yielded micro-batch; independent of dp_size at step boundaries."""
        return {"version": STATE_VERSION, "kind": "indexed", "split": self.split,
                "samples_consumed": self.samples_consumed, "micro_in_step": self._micro % self.grad_accum,
                "epoch": self.samples_consumed // self.n_samples, "n_samples": self.n_samples,
                "seq_len": self.seq_len, "seed": self.seed, "micro_batch_size": self.micro_batch_size,
                "grad_accum": self.grad_accum, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != "indexed" or state.get("version") != STATE_VERSION:
            raise DataError(f"data-loader state is not an indexed-source state of version {STATE_VERSION}: "
                            f"kind={state.get('kind') if isinstance(state, dict) else type(state).__name__!r}")
        if (state["n_samples"], state["seq_len"]) != (self.n_samples, self.seq_len):
            raise DataError(f"data-loader state is for {state['n_samples']} windows of seq_len {state['seq_len']}, "
                            f"this loader has {self.n_samples} of seq_len {self.seq_len}: different corpus or seq_len")
        check_seed_and_split(state, self)
        self._consumed, self._micro = int(state["samples_consumed"]), int(state["micro_in_step"])


def _check_args(cfg: DataConfig, split: str, seq_len: int, micro_batch_size: int, grad_accum: int,
                dp_rank: int, dp_size: int) -> None:
    if cfg.source not in SOURCES:
        raise DataError(f"unknown data.source {cfg.source!r}; allowed: {', '.join(SOURCES)}")
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    for name, v, lo in (("seq_len", seq_len, 1), ("micro_batch_size", micro_batch_size, 1),
                        ("grad_accum", grad_accum, 1), ("dp_size", dp_size, 1), ("data.num_workers", cfg.num_workers, 0)):
        if not isinstance(v, int) or v < lo:
            raise DataError(f"{name} must be an integer >= {lo}, got {v!r}")
    if not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")


def build_dataloader(cfg: DataConfig, tok: Tokenizer, split: str, seq_len: int, micro_batch_size: int,
                     grad_accum: int = 1, dp_rank: int = 0, dp_size: int = 1, seed: int = 0):
    """The loader of `split` ("train" | "val") for data-parallel rank `dp_rank` of `dp_size`.

    Yields (x, y) LongTensors [micro_batch_size, seq_len], micro-batches in step-major order (grad_accum
    of them per optimizer step); `state_dict()` / `load_state_dict()` give the exact position. Local
    corpora (shakespeare, text) are tokenized on first use into a cache identical to `train.prepare`
    output; `hf` streams (see `train.data.hf.HFStreamLoader`: its order depends on the global batch and
    `data.stream_shards`, not on the layout).
    """
    _check_args(cfg, split, seq_len, micro_batch_size, grad_accum, dp_rank, dp_size)
    if cfg.mixture is not None:
        from train.data.mixture import build_mixture_loader

        return build_mixture_loader(cfg, tok, split, seq_len, micro_batch_size, grad_accum, dp_rank, dp_size, seed)
    if cfg.source == "hf":
        from train.data.hf import HFStreamLoader

        return HFStreamLoader(cfg, tok, split, seq_len, micro_batch_size, grad_accum, dp_rank, dp_size, seed)
    if cfg.source == "tokens":
        if not cfg.path:
            raise DataError("data.path is required for data.source=tokens (a dir written by python -m train.prepare)")
        root = cfg.path
    else:
        root = ensure_tokens(cfg, tok, progress=dp_rank == 0)
    if split == "val" and cfg.source != "tokens" and cfg.val_fraction == 0:
        raise DataError("no validation split: data.val_fraction is 0")
    store = TokenStore(root, split, tok)
    return IndexedLoader(store, split, seq_len, micro_batch_size, grad_accum, dp_rank, dp_size, seed,
                         cfg.shuffle, cfg.num_workers)
