"""strategy=zero1|zero2|zero3 (DeepSpeed) on 2 real gloo ranks: numerics vs one process, exact resume,
zero.Init build, sharded state size, optimizer offload, the generated ds_config and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    CHAR,
    CHAR_BASE,
    assert_losses_close,
    build_engine_of,
    ckpt,
    corpus_overrides,
    init_gloo,
    leave_gloo,
    losses_by_step,
    make_cfg,
    one_line_error,
    session_run,
    single_losses,
    single_run,
    spawn,
    tiny_cfg,
    tiny_gpt_config,
    train_in_process,
)

pytest.importorskip("deepspeed")

# parameters below the persistence threshold stay whole under ZeRO-3: 0 makes the tiny model shard.
# The optimizer state is offloaded to CPU (strategy.offload=optimizer), so the offload path is the one
# compared with the single process and resumed bitwise (the in-process test covers no offload).
ZERO3 = ["strategy=zero3", "train.max_steps=20", "train.micro_batch_size=2", "train.ckpt_every=10",
         "strategy.param_persistence_threshold=0", "strategy.offload=optimizer"]


def zero3_run(f) -> Path:
    return session_run(f, "zero3", ZERO3, nproc=2)


def test_zero3_matches_single_process(tmp_path_factory):
    run = zero3_run(tmp_path_factory)
    assert_losses_close(losses_by_step(run), single_losses(tmp_path_factory), range(1, 21), 1e-5)
    assert_losses_close(losses_by_step(run, "val_loss"), losses_by_step(single_run(tmp_path_factory), "val_loss"), [10, 20], 1e-5)
    meta = json.loads((ckpt(run, 20) / "meta.json").read_text())
    assert (meta["format"], meta["zero_stage"], meta["world_size"]) == ("deepspeed", 3, 2)
    assert "offload: optimizer" in (run / "config.yaml").read_text()


def test_zero3_exact_resume(tmp_path_factory):
    ref = losses_by_step(zero3_run(tmp_path_factory))
    run = session_run(tmp_path_factory, "zero3_resume", [*ZERO3, f"resume={ckpt(zero3_run(tmp_path_factory), 10)}"],
                      nproc=2)
    got = losses_by_step(run)
    assert sorted(got) == list(range(11, 21))
    for s in range(11, 21):
        assert got[s] == ref[s], f"step {s}: {got[s]!r} != {ref[s]!r}"


def zero2_run(f) -> Path:
    """ZeRO-2, micro-batch 1 x grad-accum 2 x 2 ranks, full activation checkpointing (test_export reuses it)."""
    return session_run(f, "zero2", ["strategy=zero2", "train.max_steps=20", "train.micro_batch_size=1",
                                    "train.grad_accum=2", "train.activation_checkpointing=full"], nproc=2)


def zero1_run(f) -> Path:
    """ZeRO-1 through the trainer (torchrun, 2 ranks x micro-batch 2); test_export reuses its checkpoint."""
    return session_run(f, "zero1", ["strategy=zero1", "train.max_steps=20", "train.micro_batch_size=2",
                                    "train.ckpt_every=0"], nproc=2)


def test_zero2_grad_accum_and_ac_match_single_process(tmp_path_factory):
    run = zero2_run(tmp_path_factory)
    assert_losses_close(losses_by_step(run), single_losses(tmp_path_factory), range(1, 21), 1e-5)


def test_zero1_through_the_trainer_matches_single_process(tmp_path_factory):
    """python -m train strategy=zero1 on 2 ranks: the single-process losses and val losses within 1e-5, a
    DeepSpeed stage-1 checkpoint."""
    run = zero1_run(tmp_path_factory)
    got = losses_by_step(run)
    assert sorted(got) == list(range(1, 21))
    assert_losses_close(got, single_losses(tmp_path_factory), range(1, 21), 1e-5)
    want_val = losses_by_step(single_run(tmp_path_factory), "val_loss")
    assert_losses_close(losses_by_step(run, "val_loss"), want_val, [10, 20], 1e-5)
    meta = json.loads((ckpt(run, 20) / "meta.json").read_text())
    assert (meta["format"], meta["zero_stage"], meta["world_size"]) == ("deepspeed", 1, 2)


# ---------------------------------------------------------------- in-process, 2 spawned ranks


def _zero_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """ZeRO-3, then ZeRO-1, in one spawned group (a spawn costs seconds of DeepSpeed start-up per rank)."""
    init_gloo(rank, world_size, port)
    results = {stage: _zero_stage(rank, world_size, stage) for stage in (3, 1)}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    leave_gloo()


def _zero_stage(rank: int, world_size: int, stage: int) -> dict:
    import deepspeed

    from train.distributed import DistInfo
    from train.parallel.deepspeed import DeepSpeedEngine

    gpt = tiny_gpt_config()
    common = {"train__seed": 7, "train__micro_batch_size": 2}
    cfg = tiny_cfg(strategy__name=f"zero{stage}", strategy__zero_stage=stage, strategy__param_persistence_threshold=0,
                   **common)
    engine = build_engine_of(cfg, DistInfo(rank=rank, local_rank=rank, world_size=world_size))
    assert isinstance(engine, DeepSpeedEngine) and engine.spec.gpt_config == gpt
    single = build_engine_of(tiny_cfg(strategy__name="single", **common), DistInfo())
    ref = dict(single.raw.named_parameters())
    module = engine.engine.module  # the plain GPT inside the DeepSpeed engine
    result: dict = {"partitioned": all(p.numel() == 0 for p in module.parameters())}
    equal = True
    for n, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            equal &= torch.equal(p.data, ref[n].data)
    result["init_equal"] = bool(equal)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 96, (4, 32), generator=g), torch.randint(0, 96, (4, 32), generator=g)
    engine.micro_step(x[2 * rank:2 * rank + 2], y[2 * rank:2 * rank + 2], last=True)
    stats = engine.step()
    single.micro_step(x, y, last=True)
    ref_stats = single.step()
    assert not stats.skipped and not ref_stats.skipped and stats.lr == ref_stats.lr
    result["grad_norm"] = [float(stats.grad_norm), float(ref_stats.grad_norm)]
    diff = 0.0
    for n, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            diff = max(diff, (p.data - ref[n].data).abs().max().item())
    result["max_param_diff"] = diff
    result["bytes"], result["single_bytes"] = engine.state_bytes(), single.state_bytes()
    return result


@pytest.fixture(scope="module")
def in_process(tmp_path_factory) -> list[dict]:
    """Per rank: {"3": ZeRO-3's result, "1": ZeRO-1's} from one spawned 2-rank group."""
    out = tmp_path_factory.mktemp("zero_in_process")
    spawn(_zero_worker, 2, str(out))
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_zero3_init_state_bytes_and_one_step(in_process):
    """Built under zero.Init (no rank holds the model), initial weights == single-process init, one
    step == the single-process step, and each rank holds half the parameters and AdamW moments."""
    for rank in range(2):
        r = in_process[rank]["3"]
        assert r["partitioned"] and r["init_equal"]
        assert r["max_param_diff"] < 1e-6, r["max_param_diff"]
        assert abs(r["grad_norm"][0] - r["grad_norm"][1]) < 1e-5 * r["grad_norm"][1], r["grad_norm"]
        b, s = r["bytes"], r["single_bytes"]
        for key in ("params", "optimizer"):
            assert abs(b[key] / s[key] - 0.5) < 0.05, (key, b[key], s[key])
        assert abs(b["master"] / s["params"] - 0.5) < 0.05  # ZeRO's fp32 master partition, reported apart


def test_zero1_one_step_and_state_bytes(in_process):
    """ZeRO-1 on 2 ranks: whole parameters on each rank, one step == the single-process step, and each
    rank holds half the AdamW moments."""
    for rank in range(2):
        r = in_process[rank]["1"]
        assert not r["partitioned"] and r["init_equal"]
        assert r["max_param_diff"] < 1e-6, r["max_param_diff"]
        assert abs(r["grad_norm"][0] - r["grad_norm"][1]) < 1e-5 * r["grad_norm"][1], r["grad_norm"]
        b, s = r["bytes"], r["single_bytes"]
        assert b["params"] == s["params"]
        assert abs(b["optimizer"] / s["optimizer"] - 0.5) < 0.05, (b["optimizer"], s["optimizer"])


# ---------------------------------------------------------------- config generation and bad input


def test_ds_config_generated_from_hydra_config(tmp_path):
    from train.parallel.deepspeed import build_ds_config

    cfg = make_cfg(strategy__name="zero3", strategy__zero_stage=3, strategy__offload="params", train__micro_batch_size=3,
                   train__grad_accum=4, optim__grad_clip=0.5, precision__name="bf16",
                   strategy__prefetch_bucket_size=123, strategy__param_persistence_threshold=7)
    ds = build_ds_config(cfg, world_size=8)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 4, 96)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    z = ds["zero_optimization"]
    assert (z["stage"], z["stage3_prefetch_bucket_size"], z["stage3_param_persistence_threshold"]) == (3, 123, 7)
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    # a user JSON overrides single keys and keeps the rest
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "fp16": {"initial_scale_power": 8}}))
    cfg.strategy.ds_config = str(user)
    ds2 = build_ds_config(cfg, world_size=8)
    assert ds2["zero_optimization"]["reduce_bucket_size"] == 1000 and ds2["zero_optimization"]["stage"] == 3
    assert ds2["fp16"]["initial_scale_power"] == 8 and ds2["fp16"]["loss_scale_window"] == 1000


@pytest.mark.parametrize("overrides, message", [
    ({"strategy__zero_stage": 4}, r"^strategy.zero_stage=4 is not one of 1, 2, 3$"),
    ({"strategy__zero_stage": 2}, r"^strategy.zero_stage=2 contradicts strategy=zero3; use strategy=zero2$"),
    ({"strategy__offload": "disk"},
     r"^strategy.offload='disk' is not supported with ZeRO stage 3; allowed: none, optimizer, params$"),
    ({"strategy__name": "zero2", "strategy__zero_stage": 2, "strategy__offload": "params"},
     r"^strategy.offload='params' is not supported with ZeRO stage 2; allowed: none, optimizer \(params needs"),
    ({"train__compile": True}, r"^train.compile=true is not supported with strategy=zero3"),
])
def test_ds_config_bad_values(overrides, message):
    from train.parallel.deepspeed import build_ds_config

    cfg = make_cfg(**{"strategy__name": "zero3", "strategy__zero_stage": 3, **overrides})
    with pytest.raises(ValueError, match=message):
        build_ds_config(cfg, world_size=2)


def test_malformed_ds_config_json_is_one_line_error(tmp_path_factory, tmp_path, capsys):
    """train.main.run (what `python -m train` calls, in this process: no second DeepSpeed start-up) with
    strategy=zero3 strategy.ds_config=bad.json returns 2 with one line naming the file and the position, and
    leaves no run dir behind."""
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 3,}\n}\n')
    code, run_dir = train_in_process(tmp_path / "run", *CHAR.overrides, *CHAR_BASE, *corpus_overrides(tmp_path_factory),
                                     "strategy=zero3", f"strategy.ds_config={bad}")
    assert code == 2
    want = f"error: strategy.ds_config={bad}: malformed JSON at line 2 column 36: " \
           f"Expecting property name enclosed in double quotes"
    assert one_line_error(capsys.readouterr().err) == want
    assert not run_dir.exists()


def test_zero3_on_one_process_runs_as_world_size_1(tmp_path_factory):
    """Plain `python -m train strategy=zero3` (no launcher): a 1-rank group, the single-process losses."""
    run = session_run(tmp_path_factory, "zero3_world1",
                      ["strategy=zero3", "train.max_steps=20", "train.micro_batch_size=4", "train.eval_steps=0",
                       "train.sample_tokens=0", "train.ckpt_every=0"], nproc=1)
    assert_losses_close(losses_by_step(run), single_losses(tmp_path_factory), range(1, 21), 1e-5)
    assert json.loads((ckpt(run, 20) / "meta.json").read_text())["world_size"] == 1
