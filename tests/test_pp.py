"""Pipeline parallelism (train/parallel/pipeline.py) on real gloo ranks, against one process.

In-process checks (one spawned 2-rank gloo group, engines built exactly as the trainer builds them) run
every schedule of ``torch.distributed.pipelining`` for 10 optimizer steps with gradient accumulation and
compare losses, global gradient norms, eval loss and generated ids with the single-process engine; fp16
loss scaling and a NaN skip must agree across stages. The trainer-level checks (``torchrun -m train``)
compose pp with FSDP2 and TP, resume a pp checkpoint on other layouts, and export it to transformers.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from helpers import (
    CHAR,
    SINGLE,
    assert_export_matches,
    assert_losses_close,
    char_run,
    ckpt,
    corpus_overrides,
    losses_by_step,
    make_cfg,
    one_line_error,
    read_metrics,
    run_train,
    session_run,
    spawn_parts,
)

STEPS = 10
B, T, ACCUM = 4, 32, 2  # each optimizer step: 2 micro-batches of 4 sequences = 2 pipeline microbatches
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zero_bubble", "zero_bubble")
EOT = 3  # the document boundary id of the document-masking checks (data.document_mask resolves the tokenizer's)


def _cfg(preset: str = "gpt2-tiny", **keys):
    base = {"model__preset": preset, "model__n_layer": 4, "model__vocab_size": 512, "train__seq_len": T,
            "train__micro_batch_size": B, "train__grad_accum": ACCUM, "train__max_steps": STEPS,
            "train__device": "cpu", "optim__warmup_steps": 2, "optim__lr": 3e-3}
    return make_cfg(**{**base, **keys})


def _batches(vocab: int, n: int = STEPS) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per step, ACCUM learnable micro-batches: counting sequences (next id = id + 1) from random starts."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        step = []
        for _ in range(ACCUM):
            start = torch.randint(0, vocab, (B, 1), generator=g)
            xy = (start + torch.arange(T + 1)) % vocab
            step.append((xy[:, :-1], xy[:, 1:]))
        out.append(step)
    return out


def _engine(cfg, world: int, rank: int, doc_mask_token: int | None = None):
    """The engine the trainer builds; `doc_mask_token`: document masking at that id (what data.document_mask=true
    resolves to with the tokenizer's end-of-text id, here a small id so the vocabulary stays 512)."""
    import dataclasses

    from train.config import resolve
    from train.distributed import DistInfo
    from train.parallel import build_engine

    spec = resolve(cfg, world)
    if doc_mask_token is not None:
        spec = dataclasses.replace(spec, gpt_config=dataclasses.replace(spec.gpt_config, doc_mask_token=doc_mask_token))
    return build_engine(cfg, spec, DistInfo(rank=rank, world_size=world, device=torch.device("cpu")))


def _train(engine, steps, poison_step: int | None = None, skip_step: int | None = None) -> dict:
    """Optimizer steps as the trainer runs them: the micro-steps' losses summed, then step(); at `skip_step` the
    spike guard's verdict (engine.skip_update after the micro-steps)."""
    out = {"loss": [], "norm": [], "skipped": [], "scale": []}
    for i, micro in enumerate(steps):
        loss = torch.zeros(())
        for j, (x, y) in enumerate(micro):
            loss += engine.micro_step(x, y, last=j == len(micro) - 1, poison=i == poison_step)
        if i == skip_step:
            engine.skip_update(x, y)
        stats = engine.step()
        out["loss"].append(float(loss))
        out["norm"].append(float(stats.grad_norm))
        out["skipped"].append(stats.skipped)
        out["scale"].append(engine.scaler.get_scale() if engine.scaler is not None else 1.0)
    x, y = steps[0][0]
    out["val"] = float(engine.eval_loss(x, y))
    ids = engine.generate(x[:1, :8], 6, temperature=1.0, top_k=None,
                          generator=torch.Generator().manual_seed(7), vocab_limit=None)
    out["ids"] = ids.tolist() if ids is not None else None
    return out


def _share_refs(rank: int, world: int, refs: dict) -> dict:
    """One-process references computed once, each by one rank (the rank's share of `refs`: name -> thunk, taken
    in turn), then every rank gets them all."""
    mine = {name: run() for i, (name, run) in enumerate(refs.items()) if i % world == rank}
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    return {name: ref for part in gathered for name, ref in part.items()}


SCHEDULE_CASES = {  # case -> (preset, schedule, extra keys)
    # the zero-bubble schedules compute torch's cross-entropy on the last stage's logits (PipelineEngine): the
    # oracle does the same, so both sum the same float32 terms
    **{s: ("gpt2-tiny", s, {"train__loss_impl": "torch"} if "zero" in s else {}) for s in SCHEDULES},
    "llama-tiny/1f1b": ("llama-tiny", "1f1b", {}),
    "falcon-40b-mini/1f1b": ("falcon-40b-mini", "1f1b", {"model__n_embd": 256}),
}


def _schedules(rank: int, world: int) -> dict:
    batches = _batches(512)
    refs = _share_refs(rank, world, {case: (lambda p=p, k=k: _train(_engine(_cfg(p, **k), 1, 0), batches))
                                     for case, (p, _, k) in SCHEDULE_CASES.items()})
    return {case: {"single": refs[case],
                   "pp": _train(_engine(_cfg(p, parallel__pp=2, parallel__pp_schedule=s, **k), world, rank), batches)}
            for case, (p, s, k) in SCHEDULE_CASES.items()}


def _doc_batches(n: int = 6) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Counting sequences cut into documents by the id EOT at random places (several per row)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        step = []
        for _ in range(ACCUM):
            xy = (torch.randint(0, 512, (B, 1), generator=g) + torch.arange(T + 1)) % 512
            xy = xy.masked_fill(torch.rand(B, T + 1, generator=g) < 0.12, EOT)
            step.append((xy[:, :-1], xy[:, 1:]))
        out.append(step)
    return out


DOC_CASES = (("gpt2-tiny", "1f1b"), ("llama-tiny", "interleaved_1f1b"), ("llama-tiny", "interleaved_zero_bubble"))


def _doc_mask(rank: int, world: int) -> dict:
    """Document masking under pp=2: every stage masks attention at the documents of its microbatch's token ids
    (learned positions restart on the first stage; RoPE positions restart on every stage)."""
    batches = _doc_batches()

    def keys(schedule: str) -> dict:
        return {"train__max_steps": 6, **({"train__loss_impl": "torch"} if "zero" in schedule else {})}

    refs = _share_refs(rank, world, {
        (f"{p}/{s}", label): (lambda p=p, s=s, m=m: _train(_engine(_cfg(p, **keys(s)), 1, 0, m), batches))
        for p, s in DOC_CASES for label, m in (("single", EOT), ("unmasked", None))})
    return {f"{p}/{s}": {"single": refs[(f"{p}/{s}", "single")], "unmasked": refs[(f"{p}/{s}", "unmasked")],
                         "pp": _train(_engine(_cfg(p, parallel__pp=2, parallel__pp_schedule=s, **keys(s)), world,
                                              rank, EOT), batches)}
            for p, s in DOC_CASES}


def _fp16(rank: int, world: int) -> dict:
    fp16 = {"precision__name": "fp16", "precision__param_dtype": "float16", "precision__autocast": True,
            "precision__grad_scaler": True}
    batches = _batches(512, 6)
    spike = {"parallel__pp_schedule": "interleaved_1f1b"}  # the tied embedding on both ends of one rank
    out = _share_refs(rank, world, {
        "single": lambda: _train(_engine(_cfg("llama-tiny", **fp16), 1, 0), batches, poison_step=2),
        "spike_single": lambda: _train(_engine(_cfg(), 1, 0), batches, skip_step=3)})  # the loss-spike guard
    out["pp"] = _train(_engine(_cfg("llama-tiny", **fp16, parallel__pp=2), world, rank), batches, poison_step=2)
    out["spike_pp"] = _train(_engine(_cfg(parallel__pp=2, **spike), world, rank), batches, skip_step=3)
    return out


def _gathered(fn):
    """A part whose every rank's result matters: gathered, rank by rank."""
    def part(rank: int, world: int) -> list:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, fn(rank, world))
        return gathered

    return part


def _all_schedules(rank: int, world: int) -> list:
    return _gathered(_schedules)(rank, world)


def _all_fp16(rank: int, world: int) -> list:
    return _gathered(_fp16)(rank, world)


def _all_doc_mask(rank: int, world: int) -> list:
    return _gathered(_doc_mask)(rank, world)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """Every in-process part in one spawned 2-rank group: {part: [rank 0's result, rank 1's]}."""
    return spawn_parts(tmp_path_factory.mktemp("pp_world2"), 2, {"schedules": _all_schedules, "fp16": _all_fp16,
                                                                    "doc_mask": _all_doc_mask})


@pytest.mark.slow
@pytest.mark.parametrize("case", [*SCHEDULES, "llama-tiny/1f1b", "falcon-40b-mini/1f1b"])
def test_pp2_equals_one_process(two_ranks, case):
    """pp=2, 4 blocks (2 stages, or 4 virtual stages for the interleaved and V schedules), 2 microbatches per step:
    10 steps' losses within 1e-5 and global gradient norms within 1e-6 (relative) of one process on the same
    global batch, on both ranks; eval loss within 1e-5; generation gives the same ids (sampled on the last
    stage, shared with the first)."""
    for rank, r in enumerate(two_ranks["schedules"]):
        single, pp = r[case]["single"], r[case]["pp"]
        assert len(pp["loss"]) == len(single["loss"]) == STEPS
        assert single["loss"][-1] < single["loss"][0] - 0.1, "the reference does not learn"
        for step, (a, b) in enumerate(zip(pp["loss"], single["loss"], strict=True), 1):
            assert abs(a - b) <= 1e-5, f"rank {rank} step {step}: pp=2 loss {a!r} vs one process {b!r}"
        for step, (a, b) in enumerate(zip(pp["norm"], single["norm"], strict=True), 1):
            assert abs(a - b) <= 1e-6 * b, f"rank {rank} step {step}: grad norm {a!r} vs one process {b!r}"
        assert abs(pp["val"] - single["val"]) <= 1e-5
        assert not any(pp["skipped"])
    r0, r1 = two_ranks["schedules"]
    assert r0[case]["pp"]["ids"] == r0[case]["single"]["ids"]
    assert r1[case]["pp"]["ids"] is None  # ids are returned on rank 0 only


@pytest.mark.slow
def test_pp2_fp16_scaling_and_nan_skip_agree_across_stages(two_ranks):
    """precision=fp16 (autocast + GradScaler) under pp=2 (llama-tiny): an injected NaN loss at step 3 makes both
    stages skip that step and halve the scale (one overflow verdict for the pipeline), and the losses follow the
    one-process fp16 run within fp16 rounding."""
    for rank, r in enumerate(two_ranks["fp16"]):
        single, pp = r["single"], r["pp"]
        assert pp["skipped"] == single["skipped"] == [False, False, True, False, False, False]
        assert pp["scale"] == single["scale"]
        assert pp["scale"][2] == pp["scale"][1] / 2
        for step, (a, b) in enumerate(zip(pp["loss"], single["loss"], strict=True), 1):
            if step == 3:
                assert math.isnan(a) and math.isnan(b)  # the poisoned step
            else:
                assert abs(a - b) <= 1e-3, f"rank {rank} step {step}: fp16 pp=2 loss {a!r} vs one process {b!r}"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gpt2-tiny/1f1b", "llama-tiny/interleaved_1f1b", "llama-tiny/interleaved_zero_bubble"])
def test_pp2_document_mask_equals_one_process(two_ranks, case):
    """Document masking under pp=2 on packed multi-document batches: 6 steps' losses within 1e-5 and gradient
    norms within 1e-5 (relative: the masked softmax rows sum in another order per microbatch; observed 3e-6) of
    one process with the mask, eval loss within 1e-5, on both ranks; the same batches without the mask give
    other losses (the mask reaches every stage)."""
    for rank, r in enumerate(two_ranks["doc_mask"]):
        single, pp, unmasked = r[case]["single"], r[case]["pp"], r[case]["unmasked"]
        for step, (a, b) in enumerate(zip(pp["loss"], single["loss"], strict=True), 1):
            assert abs(a - b) <= 1e-5, f"rank {rank} step {step}: pp=2 masked loss {a!r} vs one process {b!r}"
        for step, (a, b) in enumerate(zip(pp["norm"], single["norm"], strict=True), 1):
            assert abs(a - b) <= 1e-5 * b, f"rank {rank} step {step}: grad norm {a!r} vs one process {b!r}"
        assert abs(pp["val"] - single["val"]) <= 1e-5
        assert max(abs(a - b) for a, b in zip(unmasked["loss"], single["loss"])) > 1e-3
    assert two_ranks["doc_mask"][0][case]["pp"]["ids"] == two_ranks["doc_mask"][0][case]["single"]["ids"]


@pytest.mark.slow
def test_pp2_spike_skip_agrees_across_stages(two_ranks):
    """The loss-spike guard's verdict under pp=2 (engine.skip_update after a step's microbatches): step 4's
    update is skipped on both stages and the next steps' losses equal one process's with the same skip (1e-5)."""
    for rank, r in enumerate(two_ranks["fp16"]):
        single, pp = r["spike_single"], r["spike_pp"]
        assert pp["skipped"] == single["skipped"] == [False, False, False, True, False, False]
        for step, (a, b) in enumerate(zip(pp["loss"], single["loss"], strict=True), 1):
            assert abs(a - b) <= 1e-5, f"rank {rank} step {step}: pp=2 loss {a!r} vs one process {b!r}"
        assert pp["val"] == pytest.approx(single["val"], abs=1e-5)


# ---------------------------------------------------------------- layouts and bad input (no process group)


def test_layout_split_and_stage_ranks():
    from train.parallel.pipeline import PipelineLayout, bubble_fraction, split_layers

    # the embedding and the head weigh one block each: the end stages hold one block fewer
    assert split_layers(6, 2) == ((0, 3), (3, 6))
    assert split_layers(8, 4) == ((0, 2), (2, 4), (4, 6), (6, 8)) or split_layers(8, 4)[0][1] <= 2
    assert split_layers(10, 4) == ((0, 2), (2, 5), (5, 8), (8, 10))
    assert split_layers(4, 4) == ((0, 1), (1, 2), (2, 3), (3, 4))  # too few blocks to weigh the ends in
    assert split_layers(6, 3, [1, 3, 2]) == ((0, 1), (1, 4), (4, 6))
    v = PipelineLayout(pp=2, schedule="zero_bubble", stages_per_rank=2, n_microbatches=4, layers=split_layers(4, 4))
    assert [v.rank_of(s) for s in range(4)] == [0, 1, 1, 0] and v.stages_of(0) == [0, 3]
    loop = PipelineLayout(pp=2, schedule="interleaved_1f1b", stages_per_rank=2, n_microbatches=4,
                          layers=split_layers(4, 4))
    assert [loop.rank_of(s) for s in range(4)] == [0, 1, 0, 1]
    assert bubble_fraction("1f1b", 4, 12) == pytest.approx(3 / 15)
    assert bubble_fraction("interleaved_1f1b", 4, 12, 2) == pytest.approx(3 / 27)


def test_default_microbatches():
    from train.config import resolve
    from train.parallel.pipeline import check_pipeline

    def m(**keys):
        cfg = _cfg(**keys)
        return check_pipeline(2, cfg.parallel, 4, cfg.train.micro_batch_size, cfg.train.grad_accum).n_microbatches

    assert m() == ACCUM  # the trainer's micro-batches are the pipeline's microbatches
    assert m(train__grad_accum=1) == 2  # one micro-batch of 4 sequences: cut in pp=2
    assert m(train__grad_accum=1, parallel__pp_microbatches=4) == 4
    assert resolve(_cfg(parallel__pp=2), 2).dims.pp == 2


@pytest.mark.parametrize("keys,world,pattern", [
    ({"parallel__pp": 8}, 8, r"parallel.pp=8 with 1 stage\(s\) per rank makes 8 stages but the model has 4 blocks"),
    ({"parallel__pp": 2, "parallel__pp_schedule": "interleaved_1f1b"}, 2, None),  # 4 virtual stages: fine
    ({"parallel__pp": 4, "parallel__pp_schedule": "interleaved_1f1b"}, 4, r"makes 8 stages but the model has 4"),
    ({"parallel__pp": 2, "parallel__pp_schedule": "dualpipe"}, 2,
     r"parallel.pp_schedule='dualpipe' is not one of gpipe, 1f1b, interleaved_1f1b"),
    ({"parallel__pp": 2, "parallel__pp_microbatches": 3}, 2, r"parallel.pp_microbatches=3: must divide the 8 "),
    ({"parallel__pp": 4, "model__n_layer": 8, "parallel__pp_microbatches": 2}, 4,
     r"parallel.pp_microbatches=2: pp_schedule=1f1b needs at least pp=4 microbatches"),
    ({"parallel__pp": 2, "parallel__pp_layers_per_stage": [1, 2]}, 2,
     r"parallel.pp_layers_per_stage=\[1, 2\] must list 2 block counts >= 1 .* summing to the model's n_layer=4"),
    ({"parallel__pp": 2, "parallel__pp_schedule": "zero_bubble", "parallel__pp_stages_per_rank": 3}, 2,
     r"parallel.pp_stages_per_rank=3: parallel.pp_schedule=zero_bubble runs exactly 2"),
    ({"parallel__pp": 2, "parallel__dp_shard": 2, "parallel__pp_schedule": "zero_bubble"}, 4,
     r"parallel.pp_schedule=zero_bubble does not combine with FSDP2"),
    ({"parallel__pp": 2, "strategy__name": "zero2"}, 2, r"parallel.pp=2 does not combine with strategy=zero2"),
    ({"parallel__pp": 2, "parallel__pp_schedule": "zero_bubble", "train__compile": True}, 2,
     r"train.compile=true does not combine with parallel.pp_schedule=zero_bubble"),
])
def test_bad_pipeline_configs_are_one_line_errors(keys, world, pattern):
    from train.config import resolve

    if pattern is None:
        resolve(_cfg(**keys), world)
        return
    with pytest.raises(ValueError) as e:
        resolve(_cfg(**keys), world)
    assert "\n" not in str(e.value) and re.search(pattern, str(e.value)), str(e.value)


def test_cli_bad_pipeline_exits_2_before_any_group(tmp_path):
    """Rank 0 of a would-be 2-rank job with more stages than blocks: exit 2, one line, no run dir, before
    init_process_group (which would wait for the missing peer)."""
    run = tmp_path / "run"
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
           "TORCHELASTIC_USE_AGENT_STORE": "True"}
    res = run_train(run, *CHAR.overrides, "train.seq_len=32", "strategy.timeout_s=5", "parallel.pp=2",
                    "parallel.pp_schedule=interleaved_1f1b", env=env, check=False, timeout=120)
    assert res.returncode == 2, res.explain()
    assert re.search(r"makes 4 stages but the model has 2 blocks", one_line_error(res.stderr)), res.stderr[-2000:]
    assert not run.exists()


# ---------------------------------------------------------------- through the trainer (torchrun)

L4 = ["model.n_layer=4"]  # the CHAR model with 4 blocks: room for pp=4
FIRST_HALF = ["train.max_steps=10", "optim.decay_steps=20", "train.ckpt_every=10"]
PP2_FSDP2 = [*L4, "parallel.pp=2", "parallel.dp_shard=2", "train.micro_batch_size=2", "train.grad_accum=2",
             "train.trace_samples=true", *FIRST_HALF]


def _single4(tmp_path_factory):
    return session_run(tmp_path_factory, "single_l4", [*SINGLE, *L4, "train.grad_accum=2"])


def _single4_losses(tmp_path_factory, key: str = "loss") -> dict[int, float]:
    out = losses_by_step(_single4(tmp_path_factory), key)
    if key == "loss":
        assert sorted(out) == list(range(1, 21)) and out[20] < out[1] - 0.5, "the reference does not learn"
    return out


@pytest.mark.slow
def test_trainer_pp2_x_fsdp2_equals_one_process(tmp_path_factory):
    """torchrun 4 ranks, pp=2 x dp_shard=2 (each stage FSDP2-sharded over 2 ranks; 1F1B over 2 microbatches):
    losses and val losses equal the one-process run within 1e-5, grad norms within 1e-4; the loss is logged
    once per step (rank 0 writes metrics.jsonl); the checkpoint records the layout; the end-of-run text sample
    is generated through the pipeline; both stages of a replica read the same samples."""
    run = session_run(tmp_path_factory, "pp2_fsdp2", PP2_FSDP2, nproc=4)
    assert_losses_close(losses_by_step(run), _single4_losses(tmp_path_factory), range(1, 11), 1e-5)
    assert_losses_close(losses_by_step(run, "grad_norm"), _single4_losses(tmp_path_factory, "grad_norm"),
                        range(1, 11), 1e-4)
    assert_losses_close(losses_by_step(run, "val_loss"), _single4_losses(tmp_path_factory, "val_loss"), [0, 10], 1e-5)
    steps = [m["step"] for m in read_metrics(run) if "loss" in m]
    assert steps == list(range(1, 11))
    meta = json.loads((ckpt(run, 10) / "meta.json").read_text())
    assert meta["format"] == "dcp" and meta["parallel"] == {"pp": 2, "dp_replicate": 1, "dp_shard": 2, "tp": 1}
    console = (run / "stdout.txt").read_text()
    assert re.search(r"sample at step 10:\n", console), console[-2000:]
    seen = [[json.loads(line)["samples"] for line in (run / "trace" / f"rank{r}.jsonl").read_text().splitlines()]
            for r in range(4)]
    # mesh (pp, dp_replicate, dp_shard, tp): ranks 0,1 are stage 0 (dp 0, 1), ranks 2,3 stage 1 (dp 0, 1)
    assert len(seen[0]) == 20 and seen[0] == seen[2] and seen[1] == seen[3]
    assert not {h for step in seen[0] for h in step} & {h for step in seen[1] for h in step}


@pytest.mark.slow
@pytest.mark.parametrize("layout,nproc,micro", [(["parallel.dp_shard=2"], 2, 2), (["parallel.pp=4"], 4, 4)],
                         ids=["pp1_dp_shard2", "pp4"])
def test_resume_pp_checkpoint_on_other_layouts(tmp_path_factory, tmp_path, layout, nproc, micro):
    """10 steps under pp=2 x dp_shard=2, then 10 more under pp=1 x dp_shard=2 or pp=4: each continues the
    uninterrupted 20-step losses within 1e-5 (stage parameters keep the whole model's names)."""
    src = ckpt(session_run(tmp_path_factory, "pp2_fsdp2", PP2_FSDP2, nproc=4), 10)
    run = tmp_path / "resumed"
    char_run(run, [*corpus_overrides(tmp_path_factory), *L4, *layout, "train.max_steps=20", "train.grad_accum=2",
                   f"train.micro_batch_size={micro}", f"resume={src}"], nproc)
    got = losses_by_step(run)
    assert sorted(got) == list(range(11, 21))
    assert_losses_close(got, _single4_losses(tmp_path_factory), range(11, 21), 1e-5)


@pytest.mark.slow
def test_export_from_pp_checkpoint_matches_transformers(tmp_path_factory, tmp_path):
    """python -m train.export of a pp=2 x dp_shard=2 checkpoint: transformers' logits equal ours within 1e-5,
    every stage's blocks are there under the whole model's names, and the weights are the trained ones."""
    src = ckpt(session_run(tmp_path_factory, "pp2_fsdp2", PP2_FSDP2, nproc=4), 10)
    sd, cfg = assert_export_matches(src, tmp_path / "hf")
    assert cfg.n_layer == 4 and {f"blocks.{i}.attn.q_proj.weight" for i in range(4)} <= set(sd)


@pytest.mark.slow
def test_trainer_3d_pp2_x_tp2_x_fsdp2_equals_one_process(tmp_path_factory):
    """8 ranks: pp=2 x dp_shard=2 x tp=2, the Falcon-40B composition in miniature (TP + SP inside each stage,
    activations passed between stages as sequence shards, full activation checkpointing, FSDP2 over 2-D
    DTensors): 10 steps' losses within 1e-5 and grad norms within 1e-4 of one process."""
    run = session_run(tmp_path_factory, "pp2_tp2_fsdp2",
                      [*L4, "parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=2", "train.micro_batch_size=2",
                       "train.grad_accum=2", "train.sample_tokens=0", "train.activation_checkpointing=full",
                       *FIRST_HALF], nproc=8)
    assert_losses_close(losses_by_step(run), _single4_losses(tmp_path_factory), range(1, 11), 1e-5)
    assert_losses_close(losses_by_step(run, "grad_norm"), _single4_losses(tmp_path_factory, "grad_norm"),
                        range(1, 11), 1e-4)
