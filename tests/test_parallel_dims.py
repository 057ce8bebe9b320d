"""Parallel dims (train/parallel/dims.py): strategy shorthands, the mesh layout, and the one-line errors
that stop a bad layout before any process group or run dir exists."""

from __future__ import annotations

import pytest
from helpers import TINY, make_cfg, one_line_error, run_train

from train.parallel.dims import ParallelDims


def dims(strategy: str = "single", world: int = 1, replicate_degree: int = 1, **parallel) -> ParallelDims:
    cfg = make_cfg(**{f"parallel__{k}": v for k, v in parallel.items()})
    return ParallelDims.resolve(strategy, cfg.parallel, world, replicate_degree)


@pytest.mark.parametrize("strategy,world,replicate,parallel,want", [
    ("single", 1, 1, {}, (1, 1, 1, 1)),
    ("ddp", 4, 1, {}, (1, 4, 1, 1)),
    ("fsdp", 4, 1, {}, (1, 1, 4, 1)),
    ("fsdp", 8, 2, {}, (1, 2, 4, 1)),  # conf/strategy/hsdp.yaml: fsdp with replicate_degree 2
    ("hsdp", 8, 4, {}, (1, 4, 2, 1)),
    ("zero3", 4, 1, {}, (1, 1, 4, 1)),
    ("single", 4, 1, {"tp": 2}, (1, 1, 2, 2)),  # explicit dims: the rest of the world shards
    ("single", 8, 1, {"tp": 2, "dp_replicate": 2}, (1, 2, 2, 2)),
    ("ddp", 4, 1, {"tp": 2}, (1, 2, 1, 2)),  # the shorthand fills only the dims left unset
    ("fsdp", 8, 1, {"tp": 4, "dp_shard": -1}, (1, 1, 2, 4)),
    ("single", 4, 1, {"dp_replicate": -1, "dp_shard": 2}, (1, 2, 2, 1)),
])
def test_shorthands_and_rest(strategy, world, replicate, parallel, want):
    d = dims(strategy, world, replicate, **parallel)
    assert (d.pp, d.dp_replicate, d.dp_shard, d.tp) == want
    assert d.world_size == world and d.dp_size == want[1] * want[2]
    assert d.engine == ("deepspeed" if strategy.startswith("zero") else "native")


def test_fsdp_when_sharding_or_asked():
    assert not dims("ddp", 4).fsdp and not dims("single", 1).fsdp
    assert dims("fsdp", 1).fsdp  # strategy=fsdp on one rank still shards (a 1-rank group)
    assert dims("single", 4, tp=2, dp_replicate=2).fsdp  # replicas x tp: HSDP with shard groups of one
    assert not dims("single", 2, tp=2).fsdp


def test_coordinates_tp_innermost():
    """Rank -> (pp, dp_replicate, dp_shard, tp), tp fastest: a TP group is contiguous ranks (one node)."""
    d = dims("single", 8, tp=2, dp_shard=2, dp_replicate=2)
    coords = [d.coordinate(r) for r in range(8)]
    assert [c["tp"] for c in coords] == [0, 1] * 4
    assert [c["dp_shard"] for c in coords] == [0, 0, 1, 1] * 2
    assert [c["dp_replicate"] for c in coords] == [0] * 4 + [1] * 4
    assert [d.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("strategy,world,parallel,pattern", [
    ("single", 4, {"tp": 3}, (r"^parallel dims pp=1 x dp_replicate=1 x dp_shard=-1 x tp=3 do not divide the world "
                             r"size 4 \(the fixed dims multiply to 3\)$")),
    ("single", 4, {"tp": 2, "dp_shard": 4}, (r"^parallel dims pp=1 x dp_replicate=1 x dp_shard=4 x tp=2 multiply to 8 "
                                            r"but the world size is 4; their product must equal it$")),
    ("zero3", 4, {"tp": 2}, (r"^parallel.tp=2 does not combine with strategy=zero3: DeepSpeed ZeRO is data-parallel "
                            r"only here; use strategy=fsdp parallel.tp=2 ")),
    ("single", 2, {"tp": 0}, r"^parallel.tp=0 must be an integer >= 1$"),
    ("single", 4, {"dp_shard": -1, "dp_replicate": -1}, r"at most one dim can take the rest of the world$"),
    ("single", 2, {}, r"^strategy=single runs one process but the world size is 2: use "),
])
def test_bad_dims_are_one_line_errors(strategy, world, parallel, pattern):
    with pytest.raises(ValueError, match=pattern):
        dims(strategy, world, **parallel)


def test_tp_must_split_heads():
    from train.config import resolve

    with pytest.raises(ValueError, match=r"^parallel.tp=4 must divide the model's n_head=2 .*allowed: 1, 2$"):
        resolve(make_cfg(model__n_head=2, model__n_embd=32, parallel__tp=4), 4)
    with pytest.raises(ValueError, match=r"^parallel.tp=4 must divide n_kv_head=3 .* it is neither$"):
        resolve(make_cfg(model__preset="llama-tiny", model__n_head=12, model__n_kv_head=3, model__n_embd=96,
                         parallel__tp=4), 4)
    with pytest.raises(ValueError, match=r"^train.seq_len=30 must be a multiple of parallel.tp=4 "):
        resolve(make_cfg(train__seq_len=30, parallel__tp=4), 4)
    spec = resolve(make_cfg(model__preset="falcon-tiny", parallel__tp=4), 4)  # MQA: K/V replicated
    assert (spec.dims.tp, spec.gpt_config.n_kv_head) == (4, 1)


# ---------------------------------------------------------------- the CLI: exit 2 before any work


# one layout error through the command line (the ordering: before init_process_group); the messages of the
# others (tp vs n_head, zero* with tp, ...) are checked above without a process, an unknown key by test_launch
@pytest.mark.parametrize("overrides,world,pattern", [
    (["parallel.tp=2", "parallel.dp_shard=3"], 4, r"multiply to 6 but the world size is 4"),
])
def test_cli_bad_layout_exits_2_before_any_group(tmp_path, overrides, world, pattern):
    """Rank 0 of a would-be ``world``-rank job: the error comes before init_process_group (which would wait
    for the missing peers until the timeout) and before a run dir is made."""
    run = tmp_path / "run"
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "1", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    res = run_train(run, *TINY, "strategy.timeout_s=5", *overrides, env=env, check=False, timeout=120)
    assert res.returncode == 2, res.explain()
    import re

    assert re.search(pattern, one_line_error(res.stderr)), res.stderr[-2000:]
    assert not run.exists()


# the mesh itself (4 gloo ranks: coordinates, TP / dp / FSDP submesh ranks): test_tp.test_one_mesh_and_its_submeshes,
# in test_tp's shared 4-rank group
