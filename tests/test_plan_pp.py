"""The planner under pipeline parallelism (train/plan.py): per-stage memory, the schedules' bubble, the
Falcon-40B layout, `--search`, and the per-stage state bytes against a real pp=2 engine.

Single-process except `test_stage_state_bytes_match_a_pp2_engine` (2 spawned gloo ranks, marked slow).
Every layout the planner proposes is checked with the trainer's own validation (ParallelDims.resolve,
check_pipeline), so the planner never proposes what the trainer rejects.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import compose, init_gloo, leave_gloo, make_cfg, spawn

from train.config import resolve
from train.parallel.dims import ParallelDims
from train.parallel.pipeline import bubble_fraction, check_pipeline, split_layers
from train.plan import (
    PlanArgs,
    _linear_io_bytes_per_token,
    deferred_weight_grads,
    in_flight,
    main,
    model_shape,
    pipeline_layout,
    pipeline_memory,
    plan,
    search,
    search_candidates,
    trainer_overrides,
)

GIB = 1024**3
REPO = Path(__file__).resolve().parents[1]
# Falcon-40B's real layout: 48 nodes x 8 A100 40 GB, tp=8 x pp=4 x dp=12, global batch 1152 x 2048
FALCON_3D = PlanArgs(model="falcon-40b", strategy="fsdp", nodes=48, gpus=8, gpu="a100", gpu_mem_gb=40.0, tp=8, pp=4,
                     dp_shard=12, micro_batch=1, grad_accum=96, seq_len=2048, precision="bf16", ac="full")


@pytest.fixture(scope="module")
def gpt2():
    return model_shape("gpt2-124m", 1024)


@pytest.fixture(scope="module")
def falcon():
    return model_shape("falcon-40b", 2048)


def _args(**kw) -> PlanArgs:
    base = {"model": "gpt2-124m", "strategy": "single", "nodes": 1, "gpus": 4, "pp": 4, "micro_batch": 1,
            "grad_accum": 8, "seq_len": 1024, "precision": "bf16", "pp_layers_per_stage": [3, 3, 3, 3]}
    return PlanArgs(**{**base, **kw})


# ---------------------------------------------------------------- per-stage memory


def test_stage_contents_ends_and_sums(gpt2):
    """Rank 0 holds the embedding (+ learned positions), the last rank the final norm and its own copy of the
    tied weight; the blocks add up to n_layer and the parameters to the model plus that one copy."""
    mem = pipeline_memory(_args(), gpt2)
    V, C = gpt2.vocab_size, gpt2.n_embd
    assert [x.stages for x in mem] == [[0], [1], [2], [3]] and [x.blocks for x in mem] == [3, 3, 3, 3]
    assert [(x.first, x.last) for x in mem] == [(True, False), (False, False), (False, False), (False, True)]
    middle = mem[1].params_local
    assert mem[2].params_local == middle == 3 * gpt2.block_params
    assert mem[0].params_local - middle == V * C + 1024 * C  # tok_emb + pos_emb
    assert mem[3].params_local - middle == V * C + 2 * C  # tied copy + final LayerNorm
    assert sum(x.params_local for x in mem) == gpt2.n_params + V * C
    for x in mem:  # fp32 parameters, gradients, AdamW m and v: 16 bytes per parameter, unsharded
        assert x.state == 16 * x.params_local


def test_in_flight_microbatches_per_schedule(gpt2):
    """GPipe keeps all m; 1F1B pp - r on rank r; interleaved a little more on the early ranks; ZB-V min(m, pp)."""
    def flights(**kw):
        a = _args(**kw)
        layout = pipeline_layout(a, gpt2)
        return [in_flight(layout, r) for r in range(4)], layout

    g, lay = flights(pp_schedule="gpipe")
    assert g == [8.0] * 4 and lay.n_microbatches == 8
    f, _ = flights(pp_schedule="1f1b")
    assert f == [4.0, 3.0, 2.0, 1.0]
    i, lay = flights(pp_schedule="interleaved_1f1b", pp_layers_per_stage=None)
    assert lay.stages_per_rank == 2
    assert i == [(2 * (4 - r - 1) + 4 + 1) / 2 for r in range(4)]  # Megatron-LM's warm-up, in units of all blocks
    assert i[0] == pytest.approx(4 * (1 + 3 / 8))  # rank 0: (1 + (p - 1) / (p v)) x 1F1B's
    z, _ = flights(pp_schedule="zero_bubble", pp_layers_per_stage=None)
    assert z == [4.0] * 4


def test_gpipe_holds_more_activations_than_1f1b_and_the_ends_are_heavier(gpt2):
    gp = pipeline_memory(_args(pp_schedule="gpipe"), gpt2)
    ob = pipeline_memory(_args(pp_schedule="1f1b"), gpt2)
    for r in range(4):  # m = 8 > pp = 4: every rank holds more under GPipe
        assert gp[r].breakdown["activations"] > ob[r].breakdown["activations"]
    per_mb = gp[1].breakdown["activations"] - ob[1].breakdown["activations"]  # 8 - 3 microbatches of 3 blocks
    assert gp[0].breakdown["activations"] - ob[0].breakdown["activations"] == pytest.approx(per_mb * 4 / 5)
    # GPipe: the same 8 microbatches on every rank, so the last rank's extra is its head (logits / loss buffers)
    acts = [x.breakdown["activations"] for x in gp]
    assert acts[1] == pytest.approx(acts[2]) and acts[3] > acts[1]
    # the binding memory is the fullest rank's: the plan reports it
    p = plan(_args(pp_schedule="gpipe"), gpt2)
    assert p.memory_gib["allocated_peak"] == pytest.approx(max(x["allocated_gib"] for x in p.pp_stages))
    assert [s["first"] for s in p.pp_stages] == [True, False, False, False]


def test_zero_bubble_adds_the_deferred_weight_gradient_inputs():
    """ZB-V on 4 ranks, 16 blocks as 8 stages of 2: every rank holds 4 blocks and 4 microbatches in flight; rank r
    also keeps the Linears' inputs and output gradients of pp - 1 - r deferred weight-gradient passes."""
    s = model_shape("gpt2-124m", 1024, n_layer=16)
    a = _args(pp_schedule="zero_bubble", pp_layers_per_stage=[2] * 8)
    layout = pipeline_layout(a, s)
    assert [layout.stages_of(r) for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert [deferred_weight_grads(layout, r) for r in range(4)] == [3, 2, 1, 0]
    mem = pipeline_memory(a, s)
    assert [x.blocks for x in mem] == [4] * 4 and [x.in_flight for x in mem] == [4.0] * 4
    # ranks 1 and 2 hold the same (two middle stages each): they differ by one deferred microbatch of 4 blocks
    one = 4 * _linear_io_bytes_per_token(s, 2, 1) * 1024
    assert mem[1].breakdown["activations"] - mem[2].breakdown["activations"] == pytest.approx(one)
    assert mem[2].breakdown["activations"] - mem[3].breakdown["activations"] == pytest.approx(one)


def test_fsdp_keeps_the_stage_unsharded_through_the_schedule(falcon):
    """torch's pipelining turns resharding and gradient sync off until the last backward: under dp_shard the
    gathered bf16 stage and its fp32 gradient are live, besides the shards."""
    mem = pipeline_memory(FALCON_3D, falcon)
    last = mem[-1]
    n = last.params_local
    assert last.breakdown["communication_buffers"] == pytest.approx(2 * n)
    assert last.breakdown["gradients"] == pytest.approx(4 * n + 4 * n / 12)
    assert last.breakdown["optimizer_states"] == pytest.approx(8 * n / 12)


# ---------------------------------------------------------------- bubble and step time


@pytest.mark.parametrize("schedule,spr,want", [("gpipe", 1, 3 / 11), ("1f1b", 1, 3 / 11),
                                               ("interleaved_1f1b", 2, 3 / 19), ("zero_bubble", 2, 0.0)])
def test_bubble_and_step_time(gpt2, schedule, spr, want):
    a = _args(pp_schedule=schedule, pp_layers_per_stage=None)
    p = plan(a, gpt2, max_batch=False)
    assert p.bubble_fraction == pytest.approx(want) == bubble_fraction(schedule, 4, 8, spr)
    assert p.pp_stages_per_rank == spr and p.pp_microbatches == 8
    one = plan(dataclasses.replace(a, pp=1, gpus=1, pp_schedule="1f1b"), gpt2, max_batch=False)
    # each rank computes a quarter of the work, stretched by the bubble
    assert p.compute_time_s == pytest.approx(one.compute_time_s / 4 / (1 - want))
    assert p.p2p_time_s > 0 and p.step_time_s == pytest.approx(p.compute_time_s + p.p2p_time_s)
    assert p.tokens_per_step == one.tokens_per_step


def test_p2p_crosses_nodes_when_a_stage_boundary_does(gpt2):
    within = plan(_args(nodes=1, gpus=4), gpt2, max_batch=False)
    across = plan(_args(nodes=4, gpus=1), gpt2, max_batch=False)
    assert across.p2p_time_s == pytest.approx(within.p2p_time_s * 300 / 50)  # NVLink vs per-GPU network


# ---------------------------------------------------------------- Falcon-40B's layout


def test_falcon_40b_real_layout_fits_40gb(falcon):
    p = plan(FALCON_3D, falcon)
    assert p.dims == {"tp": 8, "pp": 4, "dp_replicate": 1, "dp_shard": 12} and p.world_size == 384
    assert p.fits and p.peak_gib < 40
    assert all(s["fits"] for s in p.pp_stages) and [s["blocks"] for s in p.pp_stages] == [15] * 4
    assert p.pp_microbatches == 96 and p.bubble_fraction == pytest.approx(3 / 99)
    assert p.tokens_per_step == 1152 * 2048  # Falcon-40B's global batch
    # the last rank (LM head + loss) binds
    assert max(p.pp_stages, key=lambda s: s["peak_gib"])["last"]


# ---------------------------------------------------------------- --search


def _trainer_accepts(p, shape) -> None:
    """The trainer's validation of the plan's layout: ParallelDims.resolve and, under pp, check_pipeline."""
    a = p.args
    given = SimpleNamespace(**{k: p.dims[k] for k in ("tp", "pp", "dp_replicate", "dp_shard")})
    strategy = a["strategy"] if a["strategy"] != "hsdp" else "fsdp"
    dims = ParallelDims.resolve(strategy, given, p.world_size)
    assert dims.as_dict() == p.dims
    assert p.dims["tp"] <= a["gpus"] and a["gpus"] % p.dims["tp"] == 0  # TP inside a node
    if p.dims["pp"] > 1:
        pcfg = SimpleNamespace(pp_schedule=a["pp_schedule"], pp_microbatches=None, pp_stages_per_rank=None,
                               pp_layers_per_stage=None)
        layout = check_pipeline(dims.pp, pcfg, shape.n_layer, a["micro_batch"], a["grad_accum"], fsdp=dims.fsdp)
        assert layout.n_microbatches == p.pp_microbatches
        assert [s["blocks"] for s in p.pp_stages] == [
            sum(b - s for s, b in (layout.layers[i] for i in layout.stages_of(r))) for r in range(dims.pp)]
        assert sum(b - s for s, b in layout.layers) == shape.n_layer


def test_search_falcon_40b_on_32_x_80gb(falcon, capsys):
    a = PlanArgs(model="falcon-40b", nodes=4, gpus=8, seq_len=2048, precision="bf16")
    found = search(a, falcon, 32)
    candidates = search_candidates(a, falcon, 32)
    assert found and found[0].fits and all(p.fits for p in found)
    assert len(found) < len(candidates)  # layouts that do not fit are dropped (8-GPU FSDP without AC, ...)
    speeds = [p.tokens_per_s for p in found]
    assert speeds == sorted(speeds, reverse=True)
    assert {p.dims["pp"] for p in found} > {1} and {p.dims["tp"] for p in found} > {1}
    for p in found:
        _trainer_accepts(p, falcon)
        assert p.tokens_per_step == 32 * 2048  # the global batch is held fixed
    for p in found[:3] + found[-2:]:  # the overrides printed for a layout run it: the trainer's whole validation
        spec = resolve(compose("model=falcon-40b", *trainer_overrides(p)), 32)
        assert spec.dims.as_dict() == {k: p.dims[k] for k in ("pp", "dp_replicate", "dp_shard", "tp")}
    # the CLI prints the same ranking and one line explaining the first
    assert main(["model=falcon-40b", "--search", "nodes=4", "gpus=8", "seq_len=2048", "--top", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "fit" in out[0] and len(out) == 2 + 3 + 2
    assert out[-1] == "trainer: " + " ".join(trainer_overrides(found[0]))
    out = out[:-1]
    first = out[2].split()
    d = found[0].dims
    assert first[:5] == ["1", str(d["tp"]), str(d["pp"]), str(d["dp_replicate"]), str(d["dp_shard"])]
    assert first[-1] == f"{found[0].tokens_per_s:,.0f}"
    assert out[-1].startswith(f"#1 tp={d['tp']} pp={d['pp']} ") and "tokens/s" in out[-1]


def test_search_reports_nothing_fits(falcon, capsys):
    assert main(["model=falcon-40b", "--search", "nodes=1", "gpus=1", "seq_len=2048"]) == 1
    assert "nothing fits" in capsys.readouterr().out


# ---------------------------------------------------------------- CLI


def test_cli_equals_plan_for_a_pp_case(capsys):
    argv = ["model=gpt2-124m", "--pp", "2", "--pp-schedule", "interleaved_1f1b", "parallel.dp_shard=2", "gpus=4",
            "grad_accum=4", "micro_batch=2", "seq_len=512", "ac=selective", "--json"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    want = plan(PlanArgs(model="gpt2-124m", pp=2, pp_schedule="interleaved_1f1b", dp_shard=2, gpus=4, grad_accum=4,
                         micro_batch=2, seq_len=512, ac="selective"))
    assert got == json.loads(json.dumps(dataclasses.asdict(want)))
    assert got["pp_stages_per_rank"] == 2 and len(got["pp_stages"]) == 2 and got["dims"]["dp_shard"] == 2
    assert main(argv[:-1]) == 0
    text = capsys.readouterr().out
    assert "pipeline: interleaved_1f1b, 4 microbatches, 2 stage(s) per rank" in text and "pipeline bubble" in text


@pytest.mark.parametrize("argv,needles", [
    (["pp=16", "gpus=16", "grad_accum=16"], ["parallel.pp=16", "12 blocks"]),  # more stages than blocks
    (["pp=2", "gpus=2", "strategy=zero3"], ["cannot combine with pp=2"]),
    (["pp=2", "gpus=2", "pp_schedule=pipedream"], ["pp_schedule='pipedream'", "1f1b"]),
    (["pp=2", "gpus=2", "grad_accum=4", "pp_microbatches=3"], ["pp_microbatches=3", "divide"]),
    (["pp=4", "gpus=4", "grad_accum=2"], ["cannot make 4 or more pipeline microbatches"]),
])
def test_cli_pp_bad_input_one_line(capsys, argv, needles):
    assert main(["model=gpt2-124m", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    for needle in needles:
        assert needle in err, (needle, err)


# ---------------------------------------------------------------- the 3D launch example


def test_falcon_3d_example_is_the_tested_script_and_the_trainer_accepts_it(falcon):
    from test_examples import SLURM, plan_job, sbatch_job, sbatch_parts

    ex_opts, ex_over, ex_code = sbatch_parts((SLURM / "falcon-40b-3d.sbatch").read_text())
    gen_opts, _, gen_code = sbatch_parts((SLURM / "torchrun.sbatch").read_text())
    assert ex_code == gen_code and ex_over
    assert set(ex_opts) - set(gen_opts) == {"--gpus-per-node", "--time"}
    for key in gen_opts:
        if key not in ("--nodes", "--job-name", "--signal"):
            assert ex_opts[key] == gen_opts[key], key
    assert ex_opts["--nodes"] == "48" and ex_opts["--gpus-per-node"] == "8"
    job = sbatch_job((SLURM / "falcon-40b-3d.sbatch").read_text())
    p = plan_job(job)
    assert p.fits and p.dims == plan(FALCON_3D, falcon).dims and p.pp_schedule == "1f1b"
    cfg = compose(*job.overrides)
    dims = ParallelDims.resolve(cfg.strategy.name, cfg.parallel, 384, cfg.strategy.replicate_degree)
    assert dims.as_dict() == {"pp": 4, "dp_replicate": 1, "dp_shard": 12, "tp": 8}
    check_pipeline(4, cfg.parallel, falcon.n_layer, cfg.train.micro_batch_size, cfg.train.grad_accum,
                   compile=bool(cfg.train.compile), fsdp=dims.fsdp)
    assert cfg.train.micro_batch_size * cfg.train.grad_accum * dims.dp_size == 1152


# ---------------------------------------------------------------- against a real pp=2 engine

N_LAYER, VOCAB, T, B, ACCUM = 4, 512, 32, 4, 2


def _pp_cfg():
    return make_cfg(model__preset="gpt2-tiny", model__n_layer=N_LAYER, model__vocab_size=VOCAB, train__seq_len=T,
                    train__micro_batch_size=B, train__grad_accum=ACCUM, train__device="cpu", parallel__pp=2,
                    optim__warmup_steps=1)


def _measure_worker(rank: int, world: int, port: int, out: Path) -> None:
    from train.config import resolve
    from train.distributed import DistInfo
    from train.parallel import build_engine

    init_gloo(rank, world, port)
    cfg = _pp_cfg()
    engine = build_engine(cfg, resolve(cfg, world), DistInfo(rank=rank, world_size=world, device=torch.device("cpu")))
    g = torch.Generator().manual_seed(0)
    for j in range(ACCUM):
        xy = torch.randint(0, VOCAB, (B, T + 1), generator=g)
        engine.micro_step(xy[:, :-1], xy[:, 1:], last=j == ACCUM - 1)
    grads = engine.state_bytes()["grads"]  # after backward, before the step frees them
    engine.step()
    measured = engine.state_bytes() | {"grads": grads, "strategy": cfg.strategy.name}
    results = [None] * world
    torch.distributed.all_gather_object(results, measured)
    if rank == 0:
        out.write_text(json.dumps(results))
    leave_gloo()


@pytest.mark.slow
def test_stage_state_bytes_match_a_pp2_engine(tmp_path):
    """The planner's per-stage parameters + gradients + optimizer bytes against engine.state_bytes() of each
    rank of a real pp=2 engine (gpt2-tiny, 4 blocks: the embedding and positions on rank 0, the final norm and
    the tied weight's copy on rank 1), after one optimizer step: within 10% (activations are not measured)."""
    out = tmp_path / "measured.json"
    spawn(_measure_worker, 2, out)
    measured = json.loads(out.read_text())
    strategy = measured[0]["strategy"]
    a = PlanArgs(model="gpt2-tiny", strategy=strategy, nodes=1, gpus=2, pp=2, micro_batch=B, grad_accum=ACCUM,
                 seq_len=T, precision="fp32")
    shape = model_shape("gpt2-tiny", T, n_layer=N_LAYER, vocab_size=VOCAB)
    mem = pipeline_memory(a, shape)
    assert [x.blocks for x in mem] == [b - s for s, b in split_layers(N_LAYER, 2)]
    for r, x in enumerate(mem):
        got = measured[r]
        n = x.params_local
        assert got["params"] == pytest.approx(4 * n, rel=0.10), (r, got, n)
        assert got["grads"] == pytest.approx(4 * n, rel=0.10), (r, got, n)
        assert got["optimizer"] == pytest.approx(8 * n, rel=0.10), (r, got, n)
        total = got["params"] + got["grads"] + got["optimizer"]
        assert total == pytest.approx(x.state, rel=0.10), (r, total, x.state)
    # the ends differ as modelled: rank 0 has the learned positions, rank 1 the final norm (both hold V x C)
    root = {name: torch.Size(shape_).numel() for name, shape_ in shape.root_tensors}
    assert measured[0]["params"] - measured[1]["params"] == 4 * (
        root["pos_emb.weight"] - root["norm_f.weight"] - root["norm_f.bias"])


def test_largest_micro_batch_under_pp_is_one_the_pipeline_splits(gpt2):
    a = _args(pp=2, gpus=2, pp_microbatches=4, micro_batch=4, grad_accum=1, pp_layers_per_stage=None,
              gpu_mem_gb=8.0)
    b = plan(a, gpt2).max_micro_batch
    assert b > 0 and b % 4 == 0
    assert plan(dataclasses.replace(a, micro_batch=b), gpt2, max_batch=False).fits
    assert not plan(dataclasses.replace(a, micro_batch=b + 4), gpt2, max_batch=False).fits
