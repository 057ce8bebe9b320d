"""The one owner of torch's global RNG seeds, per purpose.

- init: the same seed on every rank (and in one process), so every layout starts from the
  single-process weights (``GPT.init_weights`` draws from per-parameter generators under it);
- training (dropout): one stream per data-parallel replica. Replica 0 keeps ``train.seed``, so its stream
  is the single-process one; the others differ, so two replicas never drop the same units. Tensor-parallel
  ranks of one replica share the stream: the embedding's dropout runs on replicated activations and must
  agree there (dropout in sequence-sharded regions then repeats its pattern across shards: harmless).
- data order and sampling use their own generators (train/data, train/sample.py), never these.
"""

from __future__ import annotations

import torch

_REPLICA_STRIDE = 1_000_003  # a prime: replica seeds never collide with nearby train.seed values


def seed_init(seed: int) -> None:
    torch.manual_seed(seed)


def seed_training(seed: int, dp_rank: int) -> None:
    torch.manual_seed(seed + _REPLICA_STRIDE * dp_rank)
