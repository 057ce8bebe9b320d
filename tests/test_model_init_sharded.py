"""replay_init(init_weights) on FSDP2 DTensor shards (2 gloo ranks) gives exactly the single-process init, ties
kept; so does an in-place global-RNG init replayed through it. init_weights() itself works on plain tensors only:
meta parameters are skipped and the global RNG is not consumed."""

from __future__ import annotations

import pytest
import torch
from helpers import init_gloo, spawn
from torch import nn

from model import GPT, GPTConfig


def _config() -> GPTConfig:
    # odd vocabulary (509 rows) and 3 rows of KV heads: uneven shards on 2 ranks, tied embeddings
    return GPTConfig.from_name("falcon-tiny", vocab_size=509, n_layer=2, n_head=6, n_kv_head=3, n_embd=48)


def _global_rng_init(model: nn.Module) -> None:
    """An init that draws in place from the global RNG, parameter by parameter (replay_init's generic path)."""
    for p in model.parameters():
        nn.init.normal_(p, 0.0, 0.02)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from train.parallel.sharded_init import replay_init

    init_gloo(rank, world, port)
    try:
        with torch.device("meta"):
            model = GPT(_config())
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        replay_init(model)  # shards still on meta: nothing to write
        assert model.tok_emb.weight.is_meta
        model.to_empty(device="cpu")
        torch.manual_seed(1234)
        rng_before = torch.get_rng_state()
        replay_init(model)
        rng_kept = torch.equal(torch.get_rng_state(), rng_before)
        assert type(model.tok_emb.weight).__name__ == "DTensor"
        assert model.lm_head.weight is model.tok_emb.weight
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
        x = torch.randint(0, 509, (2, 8), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(x)
        model.reshard()  # the root stays unsharded after forward: back to DTensor shards
        torch.manual_seed(99)
        with torch.no_grad():
            replay_init(model, lambda: _global_rng_init(model))
        drawn = {n: p.full_tensor() for n, p in model.named_parameters()}
        rng_after_drawn = torch.get_rng_state()
        if rank == 0:
            torch.save({"params": full, "logits": logits, "rng_kept": rng_kept, "drawn": drawn,
                        "rng_after_drawn": rng_after_drawn}, out)
        # leave together: a rank that tears gloo down while its peer is still busy (rank 0 saving) can
        # abort in gloo's destructor ("terminate called without an active exception"), seen under load
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank0(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("init_sharded") / "rank0.pt"
    spawn(_worker, 2, str(out))
    return torch.load(out, weights_only=True)


def test_fsdp2_sharded_init_equals_single_process(rank0: dict) -> None:
    got = rank0
    torch.manual_seed(1234)
    ref = GPT(_config()).eval()
    ref_params = dict(ref.named_parameters())
    assert got["params"].keys() == ref_params.keys()
    for name, p in ref_params.items():
        assert torch.equal(got["params"][name], p), name
    x = torch.randint(0, 509, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], ref(x), rtol=1e-6, atol=1e-6)
    assert got["rng_kept"], "replay_init(init_weights) consumed the global RNG"


def test_fsdp2_replayed_global_rng_init_equals_single_process(rank0: dict) -> None:
    """In-place draws on DTensors are replayed full-size: same values and same RNG state as one process."""
    with torch.device("meta"):
        ref = GPT(_config())
    ref.to_empty(device="cpu")
    ref.tie_weights()
    torch.manual_seed(99)
    with torch.no_grad():
        _global_rng_init(ref)
    ref_params = dict(ref.named_parameters())
    assert rank0["drawn"].keys() == ref_params.keys()
    for name, p in ref_params.items():
        assert torch.equal(rank0["drawn"][name], p), name
    assert torch.equal(rank0["rng_after_drawn"], torch.get_rng_state())


def test_init_weights_skips_meta_and_keeps_global_rng() -> None:
    with torch.device("meta"):
        m = GPT(_config())
    m.init_weights()  # shapes only: a no-op, no error
    assert m.tok_emb.weight.is_meta and m.blocks[0].attn.q_proj.weight.is_meta
    m.to_empty(device="cpu")
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    m.init_weights()
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(1234)
    ref = GPT(_config())
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
