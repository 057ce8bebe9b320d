"""strategy=fsdp (FSDP2) on 2 real gloo ranks: numerics vs one process, exact and N->M resume,
meta-device init, sharded state size, offload, HSDP, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_losses_close,
    build_engine_of,
    char_run,
    ckpt,
    corpus_overrides,
    init_gloo,
    leave_gloo,
    losses_by_step,
    make_cfg,
    read_metrics,
    session_run,
    single_losses,
    single_run,
    spawn,
    tiny_cfg,
    tiny_gpt_config,
)

# 2 ranks x micro-batch 2 = the single run's global batch of 4
FSDP = ["strategy=fsdp", "train.max_steps=20", "train.micro_batch_size=2", "train.ckpt_every=10"]


def fsdp_run(f) -> Path:
    return session_run(f, "fsdp", FSDP, nproc=2)


def test_fsdp_matches_single_process(tmp_path_factory):
    want, run = single_losses(tmp_path_factory), fsdp_run(tmp_path_factory)
    got = losses_by_step(run)
    assert_losses_close(got, want, range(1, 21), 1e-5)
    assert_losses_close(losses_by_step(run, "val_loss"), losses_by_step(single_run(tmp_path_factory), "val_loss"), [10, 20], 1e-5)
    meta = json.loads((ckpt(run, 20) / "meta.json").read_text())
    assert (meta["format"], meta["strategy"], meta["world_size"]) == ("dcp", "fsdp", 2)


def test_only_rank_0_writes_metrics_and_console_lines(tmp_path_factory):
    """The 2-rank fsdp run: metrics.jsonl holds each train step and each eval exactly once, and the console
    (both ranks' stdout, as torchrun passes it on) shows each step line and each val line exactly once."""
    run = fsdp_run(tmp_path_factory)
    events = read_metrics(run)
    assert [e["step"] for e in events if "loss" in e] == list(range(1, 21))
    assert [e["step"] for e in events if "val_loss" in e] == [0, 10, 20]
    console = (run / "stdout.txt").read_text()
    assert [int(s) for s in re.findall(r"^step +(\d+) \| loss ", console, re.MULTILINE)] == list(range(1, 21))
    assert [int(s) for s in re.findall(r"^step +(\d+) \| val loss ", console, re.MULTILINE)] == [0, 10, 20]


def test_fsdp_composes_accum_ac_offload(tmp_path_factory):
    """Micro-batch 1 x grad-accum 2 x 2 ranks (no reduce on the first micro-step), full activation
    checkpointing and parameter CPU offload: still the single-process losses."""
    run = session_run(tmp_path_factory, "fsdp_compose",
                      ["strategy=fsdp", "train.max_steps=20", "train.micro_batch_size=1", "train.grad_accum=2",
                       "train.activation_checkpointing=full", "strategy.offload=params"], nproc=2)
    assert_losses_close(losses_by_step(run), single_losses(tmp_path_factory), range(1, 21), 1e-5)


def test_fsdp_exact_resume(tmp_path_factory):
    """10 steps + resume for 10 == 20 uninterrupted, bitwise."""
    ref = losses_by_step(fsdp_run(tmp_path_factory))
    run = session_run(tmp_path_factory, "fsdp_resume",
                      [*FSDP, f"resume={ckpt(fsdp_run(tmp_path_factory), 10)}"], nproc=2)
    got = losses_by_step(run)
    assert sorted(got) == list(range(11, 21))
    for s in range(11, 21):
        assert got[s] == ref[s], f"step {s}: {got[s]!r} != {ref[s]!r}"


def test_fsdp_resume_2_to_1_to_2(tmp_path_factory):
    """A 2-rank checkpoint continues on 1 rank (micro-batch 4), and that one's checkpoint on 2 ranks,
    with the uninterrupted run's losses: DCP reshards, the data order is world-size free."""
    ref = losses_by_step(fsdp_run(tmp_path_factory))
    one = session_run(tmp_path_factory, "fsdp_2to1",
                      ["strategy=fsdp", "train.max_steps=20", "train.micro_batch_size=4", "train.ckpt_every=5",
                       f"resume={ckpt(fsdp_run(tmp_path_factory), 10)}"], nproc=1)
    assert_losses_close(losses_by_step(one), ref, range(11, 21), 1e-5)
    assert json.loads((ckpt(one, 15) / "meta.json").read_text())["world_size"] == 1
    two = session_run(tmp_path_factory, "fsdp_1to2", [*FSDP, f"resume={ckpt(one, 15)}"], nproc=2)
    assert_losses_close(losses_by_step(two), ref, range(16, 21), 1e-5)


# ---------------------------------------------------------------- in-process, 2 spawned ranks


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def _build_worker(rank: int, world_size: int, port: int, out_dir: str, replicate: int, hf_dir: str | None) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from model import GPT
    from train.distributed import DistInfo
    from train.parallel import ParallelDims
    from train.parallelize import apply_fsdp

    init_gloo(rank, world_size, port)
    gpt = tiny_gpt_config()
    common = {"train__seed": 7, "optim__grad_clip": 1.0}
    cfg = tiny_cfg(strategy__name="fsdp", strategy__replicate_degree=replicate, **common)
    result: dict = {}

    # sharding happens on meta, before any parameter memory exists
    with torch.device("meta"):
        meta_model = GPT(gpt)
    mesh = ParallelDims(dp_replicate=replicate, dp_shard=world_size // replicate, fsdp=True).with_device("cpu")
    apply_fsdp(meta_model, mesh.fsdp_mesh, param_dtype=torch.float32, reduce_dtype=torch.float32,
               reshard_after_forward=True, offload_params=False)
    params = list(meta_model.parameters())
    result["all_dtensor_on_meta"] = all(isinstance(p, DTensor) and p.to_local().is_meta for p in params)
    result["local_numel"] = sum(p.to_local().numel() for p in params)
    result["global_numel"] = sum(p.numel() for p in params)

    # the engine's initial weights == the single-process init for the same seed
    engine = build_engine_of(cfg, DistInfo(rank=rank, local_rank=rank, world_size=world_size))
    assert engine.spec.gpt_config == gpt and engine.dims.fsdp
    result["dims"] = engine.dims.as_dict()
    single = build_engine_of(tiny_cfg(strategy__name="single", **common), DistInfo())
    ref = dict(single.raw.named_parameters())
    result["init_equal"] = all(torch.equal(p.full_tensor(), ref[n]) for n, p in engine.raw.named_parameters())
    result["placements"] = [type(pl).__name__ for pl in engine.raw.tok_emb.weight.placements]

    # two optimizer steps on global batches of 4 split over the ranks == the single-process steps
    g = torch.Generator().manual_seed(0)
    per = 4 // world_size
    result["losses"], result["grad_norm"] = [], []
    for _ in range(2):
        x, y = torch.randint(0, 96, (4, 32), generator=g), torch.randint(0, 96, (4, 32), generator=g)
        loss = engine.micro_step(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per], last=True)
        dist.all_reduce(loss)
        stats = engine.step()
        ref_loss = single.micro_step(x, y, last=True)
        ref_stats = single.step()
        assert not stats.skipped and not ref_stats.skipped and stats.lr == ref_stats.lr
        result["losses"].append([loss.item() / world_size, ref_loss.item()])
        result["grad_norm"].append([float(stats.grad_norm), float(ref_stats.grad_norm)])
    result["max_param_diff"] = max((p.full_tensor() - ref[n]).abs().max().item()
                                   for n, p in engine.raw.named_parameters())
    result["bytes"] = engine.state_bytes()
    result["single_bytes"] = single.state_bytes()

    if hf_dir is not None:  # model.init_from under fsdp: each rank ends up holding only its shards of the HF weights
        init_cfg = tiny_cfg(strategy__name="fsdp", model__init_from=hf_dir, **common)
        hf_engine = build_engine_of(init_cfg, DistInfo(rank=rank, local_rank=rank, world_size=world_size))
        hf_single = build_engine_of(tiny_cfg(strategy__name="single", model__init_from=hf_dir, **common), DistInfo())
        hf_ref = dict(hf_single.raw.named_parameters())
        params = dict(hf_engine.raw.named_parameters())
        result["init_from"] = {
            "equal": params.keys() == hf_ref.keys() and all(torch.equal(_full(p), hf_ref[n]) for n, p in params.items()),
            "not_seed_init": not torch.equal(hf_ref["tok_emb.weight"], ref["tok_emb.weight"]),
            "local_bytes": sum(_local(p).numel() * p.element_size() for p in params.values()),
            "bytes": hf_engine.state_bytes()["params"], "single_bytes": hf_single.state_bytes()["params"]}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    leave_gloo()


@pytest.mark.parametrize("world,replicate", [(2, 1), (4, 2)], ids=["fsdp2", "hsdp2x2"])
def test_fsdp_meta_init_state_bytes_and_two_steps(tmp_path_factory, tmp_path, world, replicate):
    """FSDP2 on 2 ranks, and real HSDP on 4 (2 replicas x shard groups of 2): sharded on meta, the
    single-process init, each rank holds half the elements (placements Shard, or Replicate + Shard) and half
    the parameter and AdamW bytes, and two steps give the single-process losses and grad norms within 1e-5.
    FSDP2 with model.init_from: the Hugging Face weights, half of their bytes on each rank."""
    hf_dir = _hf_char_model(tmp_path_factory, tmp_path / "hf") if replicate == 1 else None
    spawn(_build_worker, world, str(tmp_path), replicate, None if hf_dir is None else str(hf_dir))
    placements = ["Shard"] if replicate == 1 else ["Replicate", "Shard"]
    for rank in range(world):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["all_dtensor_on_meta"], "fully_shard must turn meta parameters into DTensor shards"
        assert r["dims"] == {"pp": 1, "dp_replicate": replicate, "dp_shard": world // replicate, "tp": 1}
        assert r["placements"] == placements
        assert r["init_equal"], "initial FSDP weights differ from the single-process init"
        assert len(r["losses"]) == 2
        for (got, want), (norm, ref_norm) in zip(r["losses"], r["grad_norm"], strict=True):
            assert abs(got - want) <= 1e-5, (rank, r["losses"])
            assert abs(norm - ref_norm) <= 1e-5 * ref_norm, (rank, r["grad_norm"])
        assert r["max_param_diff"] < 1e-6, r["max_param_diff"]
        # the shard group has 2 ranks in both layouts: each rank holds half of parameters and AdamW state
        b, s = r["bytes"], r["single_bytes"]
        assert abs(r["local_numel"] / r["global_numel"] - 0.5) < 0.05, (r["local_numel"], r["global_numel"])
        for key in ("params", "optimizer"):
            assert abs(b[key] / s[key] - 0.5) < 0.05, (key, b[key], s[key])
        if hf_dir is not None:  # model.init_from: the HF weights, and each rank holds half of their bytes
            h = r["init_from"]
            assert h["equal"] and h["not_seed_init"], h
            assert h["local_bytes"] == h["bytes"] and abs(h["bytes"] / h["single_bytes"] - 0.5) < 0.05, h


def _hf_char_model(tmp_path_factory, path: Path) -> Path:
    """A transformers GPT-2 of the CHAR shape, with the character tokenizer (model.init_from's source)."""
    import shutil

    import transformers

    corpus_overrides(tmp_path_factory)  # writes the character tokenizer once per session
    torch.manual_seed(3)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=96)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path_factory.getbasetemp() / "sharded_data" / "chartok" / name, path / name)
    return path


# ---------------------------------------------------------------- bad input


def test_fsdp_bad_input_messages():
    from train.config import ConfigError, validate
    from train.parallel import ParallelDims

    with pytest.raises(ConfigError, match=r"^strategy.offload='optimizer' is not supported by strategy=fsdp; "
                                          r"allowed: none, params"):
        validate(make_cfg(strategy__name="fsdp", strategy__offload="optimizer"))
    cfg = make_cfg(strategy__name="fsdp", strategy__replicate_degree=3)
    with pytest.raises(ValueError, match=r"^strategy.replicate_degree=3 must be >= 1 and divide the world size 2$"):
        ParallelDims.resolve("fsdp", cfg.parallel, 2, cfg.strategy.replicate_degree)


def test_fsdp_resumes_a_single_process_checkpoint(tmp_path_factory, tmp_path):
    """Every native layout writes DCP: a single-process checkpoint (step 10) continues under fsdp on one
    process with the uninterrupted single run's losses, and writes an fsdp checkpoint."""
    single = single_run(tmp_path_factory)
    meta = json.loads((ckpt(single, 10) / "meta.json").read_text())
    assert (meta["format"], meta["strategy"], meta["world_size"]) == ("dcp", "single", 1)
    assert meta["parallel"] == {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 1}
    run = tmp_path / "run"
    char_run(run, [*corpus_overrides(tmp_path_factory), "strategy=fsdp", "train.max_steps=20",
                    "train.micro_batch_size=4", "train.ckpt_every=10", f"resume={ckpt(single, 10)}"])
    got = losses_by_step(run)
    assert sorted(got) == list(range(11, 21))
    assert_losses_close(got, single_losses(tmp_path_factory), range(11, 21), 1e-5)
    assert_losses_close(losses_by_step(run, "val_loss"), losses_by_step(single, "val_loss"), [20], 1e-5)
    meta = json.loads((ckpt(run, 20) / "meta.json").read_text())
    assert (meta["format"], meta["strategy"], meta["world_size"]) == ("dcp", "fsdp", 1)
