"""Failures sorted into the documented exit codes (train/ops/errors.py, ../shared/DESIGN.md), each the way a
new user meets it: an internal error (1: run dir kept, traceback in error.txt), bad input (2), a full disk
while saving (5: a real tmpfs when this machine can mount one), two runs on one run dir (a real second
process), a re-run over an earlier run's files, run.dir through a file, a jsonl of null texts, a garbage
checkpoint. Single-process runs on the tiny model."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from helpers import TINY, losses_of, one_line_error, read_metrics, run_train, start_train, train_in_process


def _digest(*files: Path) -> list[str]:
    return [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]


def _latest(run_dir: Path) -> str | None:
    marker = run_dir / "checkpoints" / "latest"
    return marker.read_text().strip() if marker.is_file() else None


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """A run that checkpoints at step 2 and then hits an internal error (a ValueError, not bad input) at step 3."""
    run_dir = tmp_path_factory.mktemp("crash") / "run"
    res = run_train(run_dir, *TINY, "train.max_steps=6", "train.ckpt_every=2", "train.fault_error_step=3", check=False)
    return res


def test_internal_error_exits_1_keeps_run_dir_and_checkpoints_and_writes_traceback(crashed):
    assert crashed.returncode == 1, crashed.explain()
    run_dir = crashed.run_dir
    line = one_line_error(crashed.stderr)
    assert "internal error" in line and "ValueError: injected internal error at step 3" in line, line
    assert f"full traceback in {run_dir / 'error.txt'}" in line, line
    assert "Traceback (most recent call last)" not in crashed.stderr  # the console gets the one line only
    text = (run_dir / "error.txt").read_text()
    assert "Traceback (most recent call last)" in text and "train/trainer.py" in text
    assert text.rstrip().endswith("ValueError: injected internal error at step 3 (train.fault_error_step)")
    # nothing deleted: config, metrics up to the failing step, the step-2 checkpoint still `latest`
    assert (run_dir / "config.yaml").is_file()
    assert [e["step"] for e in read_metrics(run_dir)] == [1, 2, 3]
    assert _latest(run_dir) == "step_0000002"
    assert {"meta.json", ".metadata", "extra_rank0.pt"} <= {p.name for p in (run_dir / "checkpoints/step_0000002").iterdir()}


def test_bad_config_still_exits_2_before_any_work_and_leaves_nothing(tmp_path, capsys):
    code, run_dir = train_in_process(tmp_path / "bad", *TINY, "train.max_steps=0")
    assert code == 2
    assert one_line_error(capsys.readouterr().err) == "error: train.max_steps=0 must be an integer >= 1"
    assert not run_dir.exists()  # the dir this invocation made is removed again


def test_rerun_over_an_earlier_run_without_checkpoint_overwrites_nothing(tmp_path, capsys):
    """A run that died before its first checkpoint leaves config.yaml + metrics.jsonl; running again into the
    same dir must not silently replace them."""
    code, run_dir = train_in_process(tmp_path / "run", *TINY, "train.max_steps=5", "train.fault_error_step=2")
    assert code == 1 and _latest(run_dir) is None
    files = [run_dir / "config.yaml", run_dir / "metrics.jsonl"]
    before = _digest(*files)
    capsys.readouterr()
    code, _ = train_in_process(run_dir, *TINY, "train.max_steps=3")
    assert code == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"run dir {run_dir} holds metrics.jsonl and config.yaml of an earlier run but no checkpoint" in line, line
    assert _digest(*files) == before and run_dir.is_dir()


def test_garbage_checkpoint_file_is_one_line_naming_the_file(crashed, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(crashed.run_dir / "checkpoints" / "step_0000002", ckpt)
    (ckpt / "extra_rank0.pt").write_bytes(bytes(range(7, 250)) * 3)  # not a zip, not a pickle of tensors
    code, _ = train_in_process(tmp_path / "run", *TINY, "train.max_steps=3", f"resume={ckpt}")
    assert code == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(f"error: checkpoint file {ckpt / 'extra_rank0.pt'} is truncated or not a checkpoint"), line
    assert "weights_only" not in line and len(line) < 250, line


def test_jsonl_whose_text_field_is_null_says_so(tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": null, "id": 1}\n{"text": null, "id": 2}\n{"text": "", "id": 3}\n')
    code, _ = train_in_process(tmp_path / "run", *TINY, "data=text", f"data.path={data}")
    assert code == 2
    line = one_line_error(capsys.readouterr().err)
    assert "2 record(s) have 'text': null" in line and "every file is empty" not in line, line


def test_run_dir_through_an_existing_file_is_one_line(tmp_path):
    from train.main import run_dir_problem

    afile = tmp_path / "notes.txt"
    afile.write_text("not a directory\n")
    res = run_train(afile / "run", *TINY, check=False, timeout=120)  # through the CLI: before Hydra makes the dir
    assert res.returncode == 2, res.explain()
    line = one_line_error(res.stderr)
    assert line == (f"error: run.dir={afile / 'run'} goes through {afile}, which is a file, not a directory; "
                    f"choose another run.dir"), line
    assert "Traceback" not in res.stderr and afile.read_text() == "not a directory\n"
    assert run_dir_problem(str(afile)) == f"run.dir={afile} is an existing file, not a directory; choose another run.dir"
    assert run_dir_problem(str(tmp_path / "new" / "run")) is None


# ---------------------------------------------------------------- disk full while saving (exit 5)


def _mount_tmpfs(path: Path, size: str) -> bool:
    """A real small tmpfs at ``path`` (needs root); False where this machine cannot mount one."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"lmforge-test-{uuid.uuid4().hex[:6]}",
                          str(path)], capture_output=True, text=True, check=False)
    return res.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MB tmpfs: one checkpoint of the tiny model (~26 MB with AdamW state) fits, a second does not."""
    mnt = tmp_path / "small"
    mounted = _mount_tmpfs(mnt, "40m")
    yield mnt, mounted
    if mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _assert_disk_full_outcome(run_dir: Path, stderr: str, code: int) -> None:
    assert code == 5, stderr[-3000:]
    line = one_line_error(stderr)
    assert "no space left" in line and str(run_dir / "checkpoints") in line, line
    assert "step_0000004" in line and "latest is still step_0000002" in line, line
    assert _latest(run_dir) == "step_0000002"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_0000002"]  # no .tmp left
    assert not (run_dir / "error.txt").exists()  # a storage error, not a bug


def test_disk_full_while_saving_exits_5_and_keeps_the_previous_checkpoint(small_disk, crashed, tmp_path):
    """A real full disk where this machine can mount a tmpfs, else the writer's ENOSPC through the test hook;
    either way the step-2 checkpoint stays `latest` and resumes (copied off the full disk) exactly: step 3
    equals the step 3 of a run without the fault (``crashed``: same config up to its failure after step 3)."""
    mnt, mounted = small_disk
    run_dir = mnt / "run"
    fault = () if mounted else ("train.fault_enospc_steps=[4]",)
    res = run_train(run_dir, *TINY, "train.max_steps=6", "train.ckpt_every=2", *fault, check=False)
    _assert_disk_full_outcome(run_dir, res.stderr, res.returncode)
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / ".lock").unlink(missing_ok=True)
    code, _ = train_in_process(copy, *TINY, "train.max_steps=6", "train.ckpt_every=2")
    assert code == 0
    assert [e["step"] for e in read_metrics(copy)] == [1, 2, 3, 4, 5, 6]
    assert losses_of(copy)[:3] == losses_of(crashed.run_dir)  # steps 1-2 before the full disk, 3 resumed: exact


def test_enospc_hook_from_the_writer_exits_5(tmp_path, capsys):
    """The fault hook alone (what runs where tmpfs cannot be mounted): the writer raises ENOSPC at step 4."""
    code, run_dir = train_in_process(tmp_path / "run", *TINY, "train.max_steps=6", "train.ckpt_every=2",
                                     "train.fault_enospc_steps=[4]")
    _assert_disk_full_outcome(run_dir, capsys.readouterr().err, code)


# ---------------------------------------------------------------- the run-dir lock (two real processes)


def test_second_run_on_a_live_run_dir_exits_2_naming_the_holder_then_a_stale_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    first = start_train(run_dir, *TINY, "train.max_steps=100000", "train.ckpt_every=1", threads=1)
    try:
        deadline = time.time() + 180
        while _latest(run_dir) is None:
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.time() < deadline, "the first run wrote no checkpoint"
            time.sleep(0.2)
        config_before = _digest(run_dir / "config.yaml")
        second = run_train(run_dir, *TINY, "train.max_steps=3", check=False, timeout=120, threads=1)
        assert second.returncode == 2, second.explain()
        line = one_line_error(second.stderr)
        assert f"run.dir {run_dir} is in use by another run" in line and f"pid {first.pid}" in line, line
        assert _digest(run_dir / "config.yaml") == config_before and run_dir.is_dir()
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock: its lock file stays behind, stale
        first.communicate(timeout=60)
    assert f"pid {first.pid}" in (run_dir / ".lock").read_text()
    saved = int(_latest(run_dir).split("_")[1])
    third = run_train(run_dir, *TINY, f"train.max_steps={saved + 1}", timeout=180)
    out = third.stdout + third.stderr
    assert "took over a stale lock" in out and f"pid {first.pid}" in out, out[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{saved:07d}'} at step {saved} " in out, out[-3000:]
    # the console says where the loss curve went
    assert f"loss curve: {run_dir / 'loss.png'}" in third.stdout and (run_dir / "loss.png").stat().st_size > 1000


# ---------------------------------------------------------------- W&B online without a key / without a network

WANDB_ONLINE = ("logger=wandb", "logger.wandb.mode=online", "logger.wandb.init_timeout_s=5")


def test_wandb_online_without_an_api_key_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    code, run_dir = train_in_process(tmp_path / "run", *TINY, *WANDB_ONLINE)
    assert code == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith("error: logger.wandb.mode=online needs a W&B API key and none is configured"), line
    assert "logger.wandb.mode=offline" in line
    assert not run_dir.exists()  # checked before any work: nothing built, nothing written


def test_wandb_online_with_an_unreachable_server_fails_in_bounded_time_or_falls_back_offline(tmp_path, monkeypatch,
                                                                                           capsys):
    unreachable = {"WANDB_MODE": "online", "WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "http://127.0.0.1:1"}
    res = run_train(tmp_path / "fallback", *TINY, *WANDB_ONLINE, "train.max_steps=2", "logger.wandb.fallback=offline",
                    env=unreachable, timeout=240)
    warning = [ln for ln in res.stdout.splitlines() if "continuing offline (logger.wandb.fallback=offline)" in ln]
    assert len(warning) == 1, res.explain()
    assert sorted((res.run_dir / "wandb").glob("offline-run-*/run-*.wandb")), "no offline W&B run"
    assert [e["step"] for e in read_metrics(res.run_dir)] == [1, 2]

    for var, value in unreachable.items():
        monkeypatch.setenv(var, value)
    t0 = time.monotonic()
    code, _ = train_in_process(tmp_path / "nofallback", *TINY, *WANDB_ONLINE, "train.max_steps=2")
    assert code == 2 and time.monotonic() - t0 < 60
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith("error: logger=wandb: could not start an online W&B run within "
                           "logger.wandb.init_timeout_s=5 (CommError"), line
    assert "logger.wandb.fallback=offline" in line
