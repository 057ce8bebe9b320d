"""init_weights() on FSDP2 DTensor shards (2 gloo ranks) gives exactly the single-process init, ties kept."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from model import GPT, GPTConfig


def _config() -> GPTConfig:
    # odd vocabulary (509 rows) and 3 rows of KV heads: uneven shards on 2 ranks, tied embeddings
    return GPTConfig.from_name("falcon-tiny", vocab_size=509, n_layer=2, n_head=6, n_kv_head=3, n_embd=48)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with torch.device("meta"):
            model = GPT(_config())
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        model.to_empty(device="cpu")
        torch.manual_seed(1234)
        model.init_weights()
        assert type(model.tok_emb.weight).__name__ == "DTensor"
        assert model.lm_head.weight is model.tok_emb.weight
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
        x = torch.randint(0, 509, (2, 8), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(x)
        if rank == 0:
            torch.save({"params": full, "logits": logits}, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_sharded_init_equals_single_process(tmp_path: Path) -> None:
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    torch.manual_seed(1234)
    ref = GPT(_config()).eval()
    ref_params = dict(ref.named_parameters())
    assert got["params"].keys() == ref_params.keys()
    for name, p in ref_params.items():
        assert torch.equal(got["params"][name], p), name
    x = torch.randint(0, 509, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], ref(x), rtol=1e-6, atol=1e-6)
