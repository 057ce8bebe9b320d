"""The Hydra app: config groups and typing, bad input (one line, non-zero exit, no run dir left),
multirun run dirs, and the resolved config written to the run dir."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import TINY, compose, one_line_error, read_metrics, run_train, train_in_process


def test_defaults_compose_to_the_documented_embedded_run():
    cfg = compose()
    assert (cfg.model.preset, cfg.strategy.name, cfg.precision.name, cfg.data.source, cfg.optim.name,
            cfg.logger.name, cfg.resume) == ("gpt2-tiny", "single", "fp32", "shakespeare", "adamw", "none", "auto")
    assert cfg.data.tokenizer == "gpt2"
    import re

    assert re.fullmatch(r"runs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", cfg.run.dir), cfg.run.dir


def test_every_model_preset_has_a_group_option():
    from model.config import PRESETS

    conf = Path(__file__).resolve().parents[1] / "conf" / "model"
    assert {p.stem for p in conf.glob("*.yaml")} == set(PRESETS)
    for name in ("falcon-40b", "llama-tiny"):
        assert compose(f"model={name}").model.preset == name


def test_group_options_set_typed_values():
    cfg = compose("precision=fp16", "strategy=ddp", "logger=wandb", "logger.wandb.mode=offline", "model.n_layer=2")
    assert cfg.precision.grad_scaler is True and cfg.precision.param_dtype == "float16"
    assert cfg.strategy.name == "ddp" and cfg.strategy.timeout_s == 1800
    assert cfg.logger.wandb.mode == "offline" and cfg.model.n_layer == 2
    from train.config import build_gpt_config

    gpt, init_from = build_gpt_config(cfg)
    assert gpt.n_layer == 2 and gpt.n_embd == 128  # override on top of the preset
    assert init_from is None


# Hydra's own errors through the command line (unknown option, typo'd key, wrong type, seq_len over the block
# size): exit 2, one line, no traceback, no run dir -- in test_launch's bad-input table, with the rest of the CLI.


@pytest.mark.parametrize("overrides,needle", [
    (("train.micro_batch_size=0",), "train.micro_batch_size=0"),
    (("train.grad_accum=0",), "train.grad_accum=0"),
    (("train.activation_checkpointing=some",), "train.activation_checkpointing='some'"),
    (("optim.min_lr=1.0",), "optim.min_lr=1.0"),
    (("data=text", "data.path=/nonexistent/corpus.txt"), "/nonexistent/corpus.txt"),
    (("model.n_head=3",), "n_head"),
], ids=["micro-batch-0", "grad-accum-0", "ac-mode", "min-lr", "missing-data-path", "bad-model-field"])
def test_bad_values_are_one_line_errors_before_work(tmp_path, capsys, overrides, needle):
    code, run_dir = train_in_process(tmp_path / "run", *TINY, *overrides)
    assert code == 2
    line = one_line_error(capsys.readouterr().err)
    assert needle in line, line
    assert not run_dir.exists()  # the dir this invocation created is gone again


def test_empty_data_path_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("")
    code, run_dir = train_in_process(tmp_path / "run", *TINY, "data=text", f"data.path={empty}")
    assert code == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(empty) in line or "empty" in line.lower(), line
    assert not run_dir.exists()


def test_run_dir_config_and_metrics_schema(tmp_path):
    code, run_dir = train_in_process(tmp_path / "run", *TINY, "train.max_steps=4", "train.log_every=2",
                                     "train.eval_every=2", "train.eval_steps=1")
    assert code == 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["run"]["dir"] == str(run_dir) and saved["train"]["max_steps"] == 4
    assert saved["model"]["n_embd"] == 32
    events = read_metrics(run_dir)
    train = [e for e in events if "loss" in e]
    evals = [e for e in events if "val_loss" in e]
    assert [e["step"] for e in train] == [2, 4]
    for e in train:
        assert set(e) == {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "mem_gb", "time"}
        assert e["tokens"] == e["step"] * 4 * 32 and e["tokens_per_s"] > 0 and 0 < e["mfu"] < 1
    assert [e["step"] for e in evals] == [0, 2, 4] and all(set(e) == {"step", "val_loss"} for e in evals)
    assert (run_dir / "loss.png").stat().st_size > 1000


@pytest.mark.slow
def test_multirun_gives_each_job_its_own_run_dir(tmp_path):
    sweep = tmp_path / "sweep"
    run_train(sweep, *TINY, "train.max_steps=2", "optim.lr=1e-3,3e-4", multirun=True)
    lrs = {}
    for job in ("0", "1"):
        cfg = yaml.safe_load((sweep / job / "config.yaml").read_text())
        assert cfg["run"]["dir"] == str(sweep / job)
        assert len([e for e in read_metrics(sweep / job) if "loss" in e]) == 2
        assert (sweep / job / "checkpoints" / "latest").is_file()
        lrs[job] = cfg["optim"]["lr"]
    assert lrs == {"0": 1e-3, "1": 3e-4}
