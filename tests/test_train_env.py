"""Environment checks before any work (train.parallel.check_environment): a launcher for strategy=ddp,
an importable deepspeed for zero*, bf16 / fp16 support of the device. The end-to-end one-line errors of
ddp-without-WORLD_SIZE and zero3-without-deepspeed are cases of tests/test_launch.py's bad-input table."""

from __future__ import annotations

import subprocess

import pytest
from helpers import PYTHON, REPO, TINY, compose, read_metrics, train_env

from train.parallel import check_environment, launched
from train.precision import precision_support_error

LAUNCH_VARS = ("WORLD_SIZE", "RANK", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_ADDR")


@pytest.fixture
def no_launcher(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_ddp_needs_a_launcher(no_launcher):
    cfg = compose(*TINY, "strategy=ddp")
    with pytest.raises(ValueError, match=r"^strategy=ddp needs one process per rank but WORLD_SIZE is not set: "
                                         r"launch with torchrun \(torchrun --nproc_per_node=N -m train strategy=ddp\)"):
        check_environment(cfg)
    no_launcher.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node=1: a real 1-rank group
    check_environment(cfg)


def test_srun_counts_as_a_launcher_and_single_needs_none(no_launcher):
    assert not launched()
    check_environment(compose(*TINY, "strategy=single"))
    for var, value in (("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("MASTER_ADDR", "127.0.0.1")):
        assert not launched()
        no_launcher.setenv(var, value)
    assert launched()
    check_environment(compose(*TINY, "strategy=ddp"))


def test_precision_support_rules():
    # bf16 on a pre-Ampere GPU is refused; with support, and on CPU, it runs
    msg = precision_support_error("bf16", "ddp", "cuda", bf16_ok=False, cpu_fp16_ok=True)
    assert msg is not None and msg.startswith("precision=bf16 needs a GPU with bf16 support") and "\n" not in msg
    assert precision_support_error("bf16", "ddp", "cuda", bf16_ok=True, cpu_fp16_ok=True) is None
    assert precision_support_error("bf16", "single", "cpu", bf16_ok=False, cpu_fp16_ok=False) is None
    # fp16 on CPU: torch autocast + GradScaler always; DeepSpeed only with oneDNN fp16 kernels
    for strategy in ("single", "ddp", "fsdp"):
        assert precision_support_error("fp16", strategy, "cpu", bf16_ok=True, cpu_fp16_ok=False) is None
    msg = precision_support_error("fp16", "zero3", "cpu", bf16_ok=True, cpu_fp16_ok=False)
    assert msg is not None and msg.startswith("precision=fp16 with strategy=zero3 on CPU needs oneDNN fp16")
    assert precision_support_error("fp16", "zero3", "cpu", bf16_ok=True, cpu_fp16_ok=True) is None
    assert precision_support_error("fp32", "zero3", "cuda", bf16_ok=False, cpu_fp16_ok=False) is None


def test_ddp_as_one_rank_under_torchrun_trains(tmp_path):
    """WORLD_SIZE=1 from torchrun is a launched run: strategy=ddp trains (the plain-process error is not hit)."""
    run_dir = tmp_path / "run"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "train",
           f"run.dir={run_dir}", *TINY, "strategy=ddp", "train.max_steps=2", "logger=none"]
    proc = subprocess.run(cmd, cwd=REPO, env=train_env(None, 2), capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert [m["step"] for m in read_metrics(run_dir) if "loss" in m] == [1, 2]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_requested_without_a_gpu_names_the_device_not_bf16(no_launcher):
    with pytest.raises(ValueError, match=r"^train.device=cuda but no CUDA GPU is visible; use train.device=auto or "
                                         r"cpu \(precision=bf16, strategy=single\)$"):
        check_environment(compose(*TINY, "train.device=cuda", "precision=bf16"))
