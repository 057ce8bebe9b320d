"""W&B: an offline run is written under the run dir and holds exactly the logged metrics (the
.wandb transaction log is read back record by record); disabled mode writes nothing."""

from __future__ import annotations

import json
import math

import pytest
from helpers import TINY, find_wandb_file, read_metrics, train_in_process, wait_for_wandb_exit, wandb_history


@pytest.mark.slow
def test_offline_run_holds_the_logged_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the config decides
    code, run_dir = train_in_process(tmp_path / "run", *TINY, "train.max_steps=6", "train.log_every=2",
                                     "train.eval_every=3", "train.eval_steps=1", "train.sample_tokens=8",
                                     "logger=wandb", "logger.wandb.mode=offline", "logger.wandb.project=lmforge-test")
    assert code == 0
    wait_for_wandb_exit(find_wandb_file(run_dir))
    history = wandb_history(find_wandb_file(run_dir))
    jsonl = read_metrics(run_dir)
    train = {e["step"]: e for e in jsonl if "loss" in e}
    logged = {row["_step"]: row for row in history if "train/loss" in row}
    assert sorted(logged) == sorted(train) == [2, 4, 6]
    for step, e in train.items():
        for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "mem_gb"):
            assert logged[step][f"train/{key}"] == pytest.approx(e[key], rel=1e-12), (step, key)
    vals = {row["_step"]: row["val/loss"] for row in history if "val/loss" in row}
    assert vals == {e["step"]: pytest.approx(e["val_loss"], rel=1e-12) for e in jsonl if "val_loss" in e}
    assert all(math.isclose(row["val/perplexity"], math.exp(row["val/loss"]), rel_tol=1e-9)
               for row in history if "val/loss" in row)
    # the text samples: a table (written as a file of the run) logged at the final step
    tables = [row for row in history if row.get("samples/_type") == "table-file"]
    assert [row["_step"] for row in tables] == [6]
    table = json.loads((find_wandb_file(run_dir).parent / "files" / tables[0]["samples/path"]).read_text())
    assert table["columns"] == ["step", "prompt", "text"]
    assert table["data"][0][0] == 6 and len(table["data"][0][2]) > 0


def test_disabled_mode_writes_no_wandb_files(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    code, run_dir = train_in_process(tmp_path / "run", *TINY, "train.max_steps=2", "logger=wandb",
                                     "logger.wandb.mode=disabled")
    assert code == 0
    assert not (run_dir / "wandb").exists()
    assert len([e for e in read_metrics(run_dir) if "loss" in e]) == 2
