"""The oracle of the sharded-strategy tests (fsdp / zero* / tp / compile / export): one process, the CHAR model
(tests/helpers.py: 2 layers, 64 wide, a character tokenizer of 96 ids) on a small text corpus, 20 steps,
global batch 4. Its support code lives in tests/helpers.py; the names are re-exported here for older imports."""

from __future__ import annotations

from helpers import (  # noqa: F401  (re-exported)
    CHAR_BASE as BASE,
    REPO,
    SINGLE,
    assert_losses_close,
    build_engine_of,
    char_run as train_run,
    ckpt,
    corpus_overrides,
    free_port,
    init_gloo,
    losses_by_step as losses,
    make_cfg,
    make_corpus,
    session_run,
    single_losses,
    single_run,
    spawn,
    tiny_cfg,
    tiny_gpt_config,
)
from helpers import CHAR

TINY = CHAR.overrides


def test_single_reference_learns(tmp_path_factory):
    """The oracle the fsdp/zero tests compare against is a real learning run (and has eval events)."""
    single_losses(tmp_path_factory)
    val = losses(single_run(tmp_path_factory), "val_loss")
    assert {10, 20} <= set(val)
