"""Checkpoints that cannot be used: missing, truncated, garbage, code-carrying, another model shape;
every one is a one-line error before any training, leaving no run dir behind. And a save that
fails never harms the previous checkpoint or ``latest``."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY, compose, one_line_error, train_in_process

BASE = (*TINY, "train.max_steps=2")


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    code, run_dir = train_in_process(tmp_path_factory.mktemp("good") / "run", *BASE)
    assert code == 0
    return run_dir


def _ckpt_copy(good_run: Path, dest: Path) -> Path:
    src = good_run / "checkpoints" / "step_0000002"
    shutil.copytree(src, dest)
    return dest


def _resume_error(tmp_path: Path, capsys, resume: str, *over: str) -> str:
    code, run_dir = train_in_process(tmp_path / "new", *BASE, f"resume={resume}", *over)
    assert code == 2
    line = one_line_error(capsys.readouterr().err)
    assert not run_dir.exists(), "a failed resume left a run dir behind"
    return line


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_resume_missing_path(tmp_path, capsys):
    line = _resume_error(tmp_path, capsys, str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in line and "no such file" in line


def test_resume_dir_without_checkpoint(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    line = _resume_error(tmp_path, capsys, str(tmp_path / "plain"))
    assert "not a checkpoint" in line


@pytest.mark.parametrize("damage", ["truncated", "garbage", "pickled-code", "bad-meta"])
def test_resume_damaged_checkpoint(tmp_path, capsys, good_run, damage):
    ckpt = _ckpt_copy(good_run, tmp_path / "ckpt")
    shards = sorted(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)
    assert shards and shards[-1].name == "__0_0.distcp", sorted(p.name for p in ckpt.iterdir())
    shard = shards[-1]  # the biggest file: model + optimizer tensors
    if damage == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        shard.write_bytes(os.urandom(4096))
    elif damage == "pickled-code":  # never unpickled as code: DCP reads tensors by byte range
        torch.save({"tok_emb.weight": _Evil()}, shard)
    else:
        (ckpt / "meta.json").write_text("{not json")
    line = _resume_error(tmp_path, capsys, str(ckpt))
    if damage == "bad-meta":
        assert line.startswith(f"error: checkpoint {ckpt}: meta.json is unreadable ("), line
    else:  # DCP's failure as one line naming the checkpoint and a non-empty reason (long ones cut with "...")
        assert re.fullmatch(rf"error: checkpoint {re.escape(str(ckpt))} does not fit this model/optimizer "
                            r"\(\S.*(\)|\.\.\.)", line), line
        if damage == "truncated":  # the reason says the file is cut short (torch's words vary by version)
            assert re.search(r"zip archive|EOF|truncated|unexpected end", line, re.IGNORECASE), line


def test_resume_into_a_different_model_shape(tmp_path, capsys, good_run):
    line = _resume_error(tmp_path, capsys, str(good_run), "model.n_embd=64")
    # names the tensor in full and both shapes (in whatever words torch puts around them)
    assert re.search(r"(?<![\w.])(model\.)?tok_emb\.weight(?![\w.])", line), line
    assert re.search(r"\[50257, 32\].*\[50257, 64\]", line), line


def test_resume_none_refuses_to_overwrite_existing_checkpoints(tmp_path, capsys, good_run):
    run_dir = tmp_path / "copy"
    shutil.copytree(good_run, run_dir)
    before = (run_dir / "checkpoints" / "latest").read_text()
    code, _ = train_in_process(run_dir, *BASE, "resume=none")
    assert code == 2
    assert "already holds checkpoints" in one_line_error(capsys.readouterr().err)
    assert (run_dir / "checkpoints" / "latest").read_text() == before
    assert run_dir.exists()  # an existing run dir is never removed


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_failed_save_keeps_previous_checkpoint_and_latest(tmp_path):
    """A save that fails half-way (model and optimizer written, then the extra state cannot be
    serialized) leaves the previous checkpoint byte-identical, ``latest`` unchanged, no temp dir."""
    from train.checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
    from train.config import resolve
    from train.distributed import init_distributed
    from train.parallel import build_engine

    cfg = compose(f"run.dir={tmp_path}", *TINY)
    spec = resolve(cfg, 1)
    engine = build_engine(cfg, spec, init_distributed("cpu"))
    kw = {"model_config": spec.gpt_config.to_dict(), "precision": "fp32", "is_main": True}
    good = save_checkpoint(engine, tmp_path, 1, {"trainer": {"step": 1}}, keep_last=1, **kw)
    before = _digest(good)
    with torch.no_grad():
        for p in engine.raw.parameters():
            p.add_(1.0)  # the failed save would carry different weights
    with pytest.raises(CheckpointError, match="saving checkpoint .*step_0000002 failed"):
        save_checkpoint(engine, tmp_path, 2, {"trainer": {"step": 2}, "bad": lambda: None}, keep_last=1, **kw)
    assert latest_checkpoint(tmp_path) == good
    assert _digest(good) == before
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_0000001"]
    # keep_last=1 prunes only after a *successful* save; overwrite of the same step is atomic too
    again = save_checkpoint(engine, tmp_path, 1, {"trainer": {"step": 1}}, keep_last=1, **kw)
    assert again == good and _digest(good) != before
