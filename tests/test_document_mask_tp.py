"""data.document_mask=true composes with tensor + sequence parallelism and activation checkpointing: on 2 gloo
ranks (tp=2, engines built as the trainer builds them) the losses of 5 steps on packed multi-document batches
equal the single-process engine's within 1e-5, for learned positions (gpt2-tiny) and RoPE + GQA (llama-tiny),
with and without full activation checkpointing; the same batches without the mask give other losses."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import init_gloo, make_cfg, spawn

STEPS, B, T, EOT = 5, 2, 32, 50256


def _cfg(preset: str, mask: bool = True, **keys):
    return make_cfg(model__preset=preset, model__n_layer=2, model__vocab_size=50304, train__seq_len=T,
                    train__micro_batch_size=B, train__max_steps=STEPS, train__device="cpu", optim__warmup_steps=1,
                    optim__lr=3e-3, data__document_mask=mask, **keys)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Counting sequences broken into documents by EOT at random places (several per row)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        xy = (torch.randint(0, 1000, (B, 1), generator=g) + torch.arange(T + 1)) % 1000
        cut = torch.rand(B, T + 1, generator=g) < 0.12
        xy = xy.masked_fill(cut, EOT)
        out.append((xy[:, :-1], xy[:, 1:]))
    return out


def _losses(cfg, world: int, rank: int) -> list[float]:
    from train.config import resolve
    from train.distributed import DistInfo
    from train.parallel import build_engine

    spec = resolve(cfg, world)
    assert spec.gpt_config.doc_mask_token == (EOT if cfg.data.document_mask else None)
    engine = build_engine(cfg, spec, DistInfo(rank=rank, world_size=world, device=torch.device("cpu")))
    losses = []
    for x, y in _batches():
        losses.append(float(engine.micro_step(x, y, last=True)))
        engine.step()
    return losses


def _worker(rank: int, world: int, port: int, out: Path) -> None:
    init_gloo(rank, world, port)
    # the single-process references are the same on every rank: each is computed once, rank 0 the masked
    # runs, rank 1 the unmasked ones (concurrently), then shared
    ref_kind, mask = ("single", True) if rank == 0 else ("unmasked", False)
    refs = {preset: _losses(_cfg(preset, mask=mask), 1, 0) for preset in ("gpt2-tiny", "llama-tiny")}
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, (ref_kind, refs))
    res = {}
    for preset in ("gpt2-tiny", "llama-tiny"):
        res[preset] = {kind: r[preset] for kind, r in gathered}
        res[preset].update(tp=_losses(_cfg(preset, parallel__tp=2), world, rank),
                           tp_ac=_losses(_cfg(preset, parallel__tp=2, train__activation_checkpointing="full"),
                                         world, rank))
    if rank == 0:
        out.write_text(json.dumps(res))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_document_mask_under_tp_and_ac_equals_one_process(tmp_path):
    out = tmp_path / "losses.json"
    spawn(_worker, 2, out)
    for preset, r in json.loads(out.read_text()).items():
        assert max(abs(a - b) for a, b in zip(r["tp"], r["single"])) < 1e-5, (preset, r)
        assert max(abs(a - b) for a, b in zip(r["tp_ac"], r["single"])) < 1e-5, (preset, r)
        assert max(abs(a - b) for a, b in zip(r["unmasked"], r["single"])) > 1e-3, (preset, r)
        assert len(r["single"]) == STEPS and r["single"][-1] < r["single"][0]
