"""The oracle of the sharded-strategy tests (fsdp / zero* / tp / compile / export): one process, the CHAR model
(tests/helpers.py: 2 layers, 64 wide, a character tokenizer of 96 ids) on a small text corpus, 20 steps,
global batch 4 (helpers.single_run). Its support code lives in tests/helpers.py."""

from __future__ import annotations

from helpers import losses_by_step, single_losses, single_run


def test_single_reference_learns(tmp_path_factory):
    """The oracle the fsdp/zero tests compare against is a real learning run (and has eval events)."""
    single_losses(tmp_path_factory)
    val = losses_by_step(single_run(tmp_path_factory), "val_loss")
    assert {10, 20} <= set(val)
