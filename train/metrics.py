"""What a run reports: ``metrics.jsonl``, the console line, ``loss.png``, Weights & Biases, and
the hardware figures behind MFU (``peak_flops``) and memory (``memory_gb``).

Only rank 0 constructs a ``MetricsLogger``; the others never touch the run dir or the network.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from train.ops.errors import WandbStartError

log = logging.getLogger("train")

# Dense (no sparsity) peak TFLOP/s from the vendors' datasheets: bf16 / fp16 on tensor cores, and fp32
# without TF32 (None where we do not carry the figure). Key: the planner's `gpu=` name; match: a substring
# of torch.cuda.get_device_name(), tried in this order (the more specific names first).
GPU_DATASHEETS: dict[str, tuple[str, dict[str, float | None]]] = {
    "h200": ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    "h100-pcie": ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    "h100-nvl": ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    "h100": ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # SXM
    "a100": ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    "a10g": ("A10G", {"bf16": 125.0, "fp16": 125.0, "fp32": None}),
    "l40s": ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": None}),
    "l4": ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": None}),
    "v100": ("V100", {"bf16": 125.0, "fp16": 125.0, "fp32": None}),
}
_MEASURED: dict[tuple[str, str], float] = {}


def _measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, repeat: int = 8,
                          budget_s: float = 0.25) -> float:
    """Achieved FLOP/s of a square matmul: the stand-in peak for devices without a datasheet entry.

    On a CPU the measurement is time-boxed: the square grows from 128 to ``n`` only while one matmul takes
    under ``budget_s / 8``, and the timed loop stops after ``budget_s`` (at least one matmul). A 16-bit matmul on
    a CPU without native support runs seconds per 1024-square: the fixed 1 + 8 of them cost every fp16 / bf16
    CPU run (each rank) ~20 s before its first step, for one MFU figure. fp32 still reaches ``n``."""
    size = n if device.type != "cpu" else min(128, n)
    while True:
        a = torch.randn(size, size, device=device, generator=None).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        t0 = time.perf_counter()
        torch.mm(a, b)  # warm-up (kernel selection, caches)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if size >= n or time.perf_counter() - t0 >= budget_s / 8:
            break
        size *= 2
    done = 0
    t0 = time.perf_counter()
    while done < repeat and (done == 0 or device.type != "cpu" or time.perf_counter() - t0 < budget_s):
        torch.mm(a, b)
        done += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * done / max(time.perf_counter() - t0, 1e-9)


def peak_flops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> tuple[float, str]:
    """Peak FLOP/s of one device for MFU, and where the number comes from.

    Known NVIDIA GPUs: the datasheet's dense bf16 figure (fp32 runs are still measured against it,
    as is customary); source ``"datasheet:<name>"``. Anything else (CPU, unknown GPU): a timed
    matmul in ``dtype``, cached per process; source ``"measured"``. The measurement uses its own
    random generator state so training RNG streams are not disturbed.
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for match, tflops in GPU_DATASHEETS.values():
            if match in name:
                return tflops["bf16"] * 1e12, f"datasheet:{match}"
    key = (str(device), str(dtype))
    if key not in _MEASURED:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            _MEASURED[key] = _measure_matmul_flops(device, dtype)
    return _MEASURED[key], "measured"


def memory_gb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on GPU, peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def format_line(m: Mapping[str, Any]) -> str:
    """The one-line console progress report."""
    return (f"step {m['step']:>6} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | gnorm {m['grad_norm']:.3f} | "
            f"{m['tokens_per_s']:,.0f} tok/s | MFU {100 * m['mfu']:.2f}% | mem {m['mem_gb']:.2f} GB")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(events: list[dict], path: Path) -> None:
    """loss.png: train loss per logged step and val loss per eval (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in events if e.get("loss") is not None]
    val = [(e["step"], e["val_loss"]) for e in events if "val_loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="val", lw=1.5, ms=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


class MetricsLogger:
    """Rank 0's sink for events: metrics.jsonl (one JSON object per line), loss.png, optional W&B."""

    def __init__(self, run_dir: Path, cfg, *, resume_step: int | None, wandb_id: str | None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        # a resumed run keeps the events up to its checkpoint and drops those the crashed run logged later
        self.events = [e for e in read_metrics(self.run_dir) if resume_step is not None and e["step"] <= resume_step]
        tmp = self.path.with_name("metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in self.events))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")  # noqa: SIM115 - kept open for the run, closed in close()
        self.wandb = WandbLogger(cfg, self.run_dir, wandb_id) if cfg.logger.name == "wandb" else None

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.run_id if self.wandb is not None else None

    def log(self, event: Mapping[str, Any]) -> None:
        # a skipped (non-finite) step logs null, not NaN: metrics.jsonl stays strict JSON
        event = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in event.items()}
        self.events.append(event)
        self._file.write(json.dumps(event) + "\n")
        self._file.flush()
        if self.wandb is not None:
            self.wandb.log(event)

    def rollback(self, to_step: int, event: Mapping[str, Any]) -> None:
        """The run went back to ``to_step`` (a spike rollback): drop the events after it, keep earlier markers
        (spikes, rollbacks), then log ``event``."""
        self._file.close()
        self.events = [e for e in self.events if e["step"] <= to_step or "event" in e]
        tmp = self.path.with_name("metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in self.events))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")  # noqa: SIM115
        self.log(event)

    @property
    def plot_path(self) -> Path:
        return self.run_dir / "loss.png"

    def plot(self) -> None:
        plot_losses(self.events, self.plot_path)

    def sample(self, step: int, prompt: str, text: str) -> None:
        if self.wandb is not None:
            self.wandb.log_sample(step, prompt, text)

    def summary(self, values: Mapping[str, Any]) -> None:
        if self.wandb is not None:
            self.wandb.summary(values)

    def close(self) -> None:
        self._file.close()
        if self.wandb is not None:
            self.wandb.finish()


def wandb_key_problem(cfg) -> str | None:
    """Before any work: ``logger=wandb`` online needs an API key (``WANDB_API_KEY`` or the netrc entry that
    ``wandb login`` writes); None when there is one or W&B is not used online."""
    import netrc
    from urllib.parse import urlparse

    w = cfg.logger.wandb
    if cfg.logger.name != "wandb" or w.mode != "online":
        return None
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return None  # the environment forces W&B off the network
    if os.environ.get("WANDB_API_KEY"):
        return None
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        if netrc.netrc(path).authenticators(host):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return (f"logger.wandb.mode=online needs a W&B API key and none is configured (WANDB_API_KEY, or `wandb login` "
            f"for {host}); log in, or use logger.wandb.mode=offline (upload later with `wandb sync`) or disabled")


class WandbLogger:
    """Weights & Biases: the resolved config, every metric event, and text samples as a table.

    ``mode=offline`` writes ``<run.dir>/wandb/offline-run-*`` for ``wandb sync`` later; ``disabled``
    makes no network attempt. The W&B run id is kept in the checkpoint so a resumed run continues
    the same W&B run.
    """

    def __init__(self, cfg, run_dir: Path, run_id: str | None) -> None:
        import wandb
        from omegaconf import OmegaConf

        w = cfg.logger.wandb
        if w.mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.wandb.mode={w.mode!r} is not one of online, offline, disabled")
        self._wandb = wandb
        self._samples: list[list[Any]] = []

        def start(mode: str):
            return wandb.init(
                project=w.project, entity=w.entity, name=w.name or run_dir.name, group=w.group,
                tags=list(w.tags), mode=mode, dir=str(run_dir), id=run_id, resume="allow" if run_id else None,
                config=OmegaConf.to_container(cfg, resolve=True),
                settings=wandb.Settings(console="off", silent=True, init_timeout=float(w.init_timeout_s)),
            )

        try:
            self.run = start(w.mode)
        except Exception as e:
            if w.mode != "online":
                raise
            why = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            if w.fallback != "offline":
                raise WandbStartError(f"logger=wandb: could not start an online W&B run within logger.wandb."
                                      f"init_timeout_s={w.init_timeout_s:g} ({why}); use logger.wandb.fallback=offline "
                                      f"to continue offline, or logger.wandb.mode=offline") from None
            log.warning(f"W&B: the online start-up failed ({why}); continuing offline (logger.wandb.fallback="
                        f"offline): `wandb sync {run_dir}/wandb/offline-run-*` uploads it later")
            self.run = start("offline")
        self.run_id = self.run.id if self.run is not None else None

    def log(self, event: Mapping[str, Any]) -> None:
        data = {k: v for k, v in event.items() if k != "step" and v is not None}
        if "val_loss" in data:
            data = {"val/loss": data["val_loss"], "val/perplexity": math.exp(min(data["val_loss"], 50.0)),
                    **{f"val/loss/{k[9:]}": v for k, v in data.items() if k.startswith("val_loss/")}}
        else:
            data = {f"train/{k}": v for k, v in data.items()}
        self.run.log(data, step=int(event["step"]))

    def log_sample(self, step: int, prompt: str, text: str) -> None:
        self._samples.append([step, prompt, text])
        # a fresh Table each time: W&B tables are immutable once logged
        self.run.log({"samples": self._wandb.Table(columns=["step", "prompt", "text"], data=list(self._samples))},
                     step=step)

    def summary(self, values: Mapping[str, Any]) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def finish(self) -> None:
        self.run.finish()
