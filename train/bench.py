"""Benchmark: tokens/s, step time, MFU/HFU and peak memory of one training configuration.

    python -m train.bench model=gpt2-124m precision=bf16 train.micro_batch_size=8 train.seq_len=1024
    torchrun --nproc_per_node 8 -m train.bench model=falcon-40b strategy=fsdp train.activation_checkpointing=full

Overrides are exactly `python -m train`'s (the same conf/ tree, composed with Hydra's compose API),
plus `bench.steps`, `bench.warmup`, `bench.data=synthetic|real`, and the parallel dims
(`parallel.tp=2 parallel.dp_shard=2`). The model, parallel layout, precision, AC and compile are built by
the trainer's own engine (train/parallel), so the figures are the trainer's. Tokens per step count the
data-parallel replicas (tensor-parallel ranks share their samples); MFU divides the model FLOPs of those
tokens by every device (FLOPs per device = FLOPs per token x tokens per step / world size). JSON goes to
stdout (rank 0), a human table to stderr.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created while active (any device, CPU included).

    Every op's outputs are recorded once per storage and counted until that storage is freed
    (a weakref finalizer on the storage). Tensors that existed before entering (parameters,
    inputs) are not counted; views of them are skipped. This is torch's own bookkeeping, free of
    allocator caching and of the C library's heap behaviour, so it is what the planner's
    activation formulas are checked against.
    """

    def __init__(self, exclude: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}
        self._skip = {t.untyped_storage().data_ptr() for t in (exclude or [])}

    def reset_peak(self) -> None:
        self.peak = self.current

    def _freed(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0 or key in self._live or key in self._skip:
                continue
            self._live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(st, self._freed, key, nbytes)
        return out


# ---- the benchmark ----------------------------------------------------------------------------

BENCH_KEYS = {"steps": 10, "warmup": 3, "data": "synthetic"}
BENCH_DATA = ("synthetic", "real")


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Separate `bench.*` keys (ours) from the trainer's Hydra overrides."""
    hydra_args, bench = [], dict(BENCH_KEYS)
    for tok in argv:
        key, eq, value = tok.partition("=")
        if key.startswith("bench."):
            name = key[len("bench."):]
            if name not in BENCH_KEYS or not eq:
                raise ValueError(f"unknown benchmark option {tok!r}; allowed: "
                                 + ", ".join(f"bench.{k}=<{type(v).__name__}>" for k, v in BENCH_KEYS.items()))
            bench[name] = type(BENCH_KEYS[name])(value) if name != "data" else value
        else:
            hydra_args.append(tok)
    if bench["steps"] < 1 or bench["warmup"] < 0:
        raise ValueError(f"bench.steps={bench['steps']} must be >= 1 and bench.warmup={bench['warmup']} >= 0")
    if bench["data"] not in BENCH_DATA:
        raise ValueError(f"bench.data={bench['data']!r} is not one of {', '.join(BENCH_DATA)}")
    return hydra_args, bench


def compose_config(overrides: list[str]) -> Any:
    """The trainer's config for `overrides` (conf/ tree + structured schema), validated like `python -m train`."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from train.config import validate  # importing train.config registers the structured schema
    from train.main import CONF_DIR

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ValueError(" ".join(str(e).split())) from None
    validate(cfg)
    return cfg


def _batches(cfg: Any, gpt_config: Any, dist: Any, kind: str, dims: Any):
    """Endless micro-batches (x, y) [B, T] on the device: random tokens, or the trainer's data loader; one
    stream per data-parallel replica (tensor-parallel ranks read the same batches)."""
    t = cfg.train
    dp_rank = dims.dp_rank(dist.rank)
    if kind == "synthetic":
        g = torch.Generator().manual_seed(t.seed + dp_rank)
        while True:
            xy = torch.randint(0, gpt_config.vocab_size, (t.micro_batch_size, t.seq_len + 1), generator=g)
            yield xy[:, :-1].to(dist.device), xy[:, 1:].to(dist.device)
    from omegaconf import OmegaConf

    from train.data import build_dataloader, get_tokenizer

    data_cfg = OmegaConf.to_object(cfg.data)
    loader = build_dataloader(data_cfg, get_tokenizer(data_cfg.tokenizer), split="train", seq_len=t.seq_len,
                              micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum, dp_rank=dp_rank,
                              dp_size=dims.dp_size, seed=t.seed)
    for x, y in loader:
        yield x.to(dist.device), y.to(dist.device)


def run_bench(cfg: Any, steps: int = 10, warmup: int = 3, data: str = "synthetic", dist: Any = None) -> dict:
    """Build the trainer's engine for `cfg`, run warmup + steps optimizer steps, return the figures."""
    from model.stats import count_params, flops_per_token
    from train.config import resolve
    from train.metrics import peak_flops
    from train.parallel import build_engine
    from train.plan import model_shape, recompute_flops_per_token
    from train.precision import to_dtype

    spec = resolve(cfg, dist.world_size)
    gpt_config, dims = spec.gpt_config, spec.dims
    t = cfg.train
    device = dist.device
    peak, source = peak_flops(device, to_dtype(cfg.precision.param_dtype))  # before the baseline: it allocates
    if dims.engine == "deepspeed":
        import deepspeed  # noqa: F401  (its import cost is not the model's memory)
    rss_base = _rss_bytes()  # CPU peak memory is reported above this (interpreter, libraries)
    engine = build_engine(cfg, spec, dist)
    cuda = device.type == "cuda"
    batches = _batches(cfg, gpt_config, dist, data, dims)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    times, loss = [], None
    for i in range(warmup + steps):
        if i == warmup and cuda:
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        t0 = time.perf_counter()
        for m in range(t.grad_accum):
            x, y = next(batches)
            loss = engine.micro_step(x, y, last=m == t.grad_accum - 1)
        engine.step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_time = statistics.median(times)

    world = dist.world_size
    tokens_per_step = t.micro_batch_size * t.seq_len * t.grad_accum * dims.dp_size
    counts = count_params(gpt_config)
    fpt = float(flops_per_token(gpt_config, t.seq_len))
    shape = model_shape(cfg.model.preset, t.seq_len, **_model_overrides(cfg))
    hfu_fpt = fpt + recompute_flops_per_token(shape, t.seq_len, t.activation_checkpointing)
    state = [{k: int(v) for k, v in engine.state_bytes().items()}]
    if world > 1:  # every rank's share, to check sharding: gathered to all (rank 0 prints)
        from torch import distributed as torch_dist

        gathered: list[Any] = [None] * world
        torch_dist.all_gather_object(gathered, state[0])
        state = gathered
    tokens_per_s = tokens_per_step / step_time
    per_device = tokens_per_s / world
    if cuda:
        peak_mem, mem_kind = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    else:
        peak_mem, mem_kind = _peak_rss_bytes() - rss_base, "peak_rss_minus_baseline"
    from train.cpu_malloc import is_tuned

    return {
        "model": cfg.model.preset,
        "n_params": counts.total,
        "strategy": cfg.strategy.name,
        "parallel": dims.as_dict(),
        "precision": cfg.precision.name,
        "activation_checkpointing": t.activation_checkpointing,
        "compile": bool(t.compile),
        # the loss path the step ran (train.loss_impl; under tensor parallelism the vocabulary-parallel loss)
        "loss_impl": "vocab_parallel" if dims.tp > 1 else t.loss_impl,
        "micro_batch_size": t.micro_batch_size,
        "grad_accum": t.grad_accum,
        "seq_len": t.seq_len,
        "world_size": world,
        "device": _device_name(device),
        "data": data,
        "cpu_malloc_tuned": is_tuned(),
        "warmup": warmup,
        "steps": steps,
        "step_time_s": step_time,
        "step_times_s": times,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": per_device,
        "flops_per_token": fpt,
        "flops_formula": "6*N + 12*L*H*Q*T, N = non-embedding parameters (tied LM head counted)",
        "flops_n": counts.non_embedding,
        "hfu_flops_per_token": hfu_fpt,
        "peak_flops": peak,
        "peak_flops_source": source,
        "mfu": per_device * fpt / peak,
        "hfu": per_device * hfu_fpt / peak,
        "peak_memory_bytes": int(peak_mem),
        "peak_memory_kind": mem_kind,
        "state_bytes": state[dist.rank],
        "state_bytes_per_rank": state,
        "loss": float(loss) if loss is not None else None,
    }


def single_process_engine(cfg: Any, device: torch.device) -> tuple[Any, Any]:
    """(engine, run spec) of ``cfg`` in this one process: what ``python -m train`` would build."""
    from train.config import resolve
    from train.distributed import DistInfo
    from train.parallel import build_engine

    spec = resolve(cfg, 1)
    return build_engine(cfg, spec, DistInfo(device=device)), spec


def _model_overrides(cfg: Any) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_object(cfg.model).overrides()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def format_table(r: dict) -> str:
    rows = [
        ("model", f"{r['model']} ({r['n_params'] / 1e6:.1f}M params)"),
        ("config", (f"{r['strategy']} x{r['world_size']} {r['precision']} ac={r['activation_checkpointing']} "
                   f"compile={r['compile']} loss={r['loss_impl']} B={r['micro_batch_size']} A={r['grad_accum']} "
                   f"T={r['seq_len']}")),
        ("device", r["device"]),
        ("step time (median)", f"{r['step_time_s'] * 1e3:.1f} ms over {r['steps']} steps after {r['warmup']} warm-up"),
        ("tokens/s", f"{r['tokens_per_s']:,.0f} ({r['tokens_per_s_per_device']:,.0f} per device)"),
        ("FLOPs/token", f"{r['flops_per_token'] / 1e9:.3f} G model, {r['hfu_flops_per_token'] / 1e9:.3f} G hardware"),
        ("peak FLOP/s", f"{r['peak_flops'] / 1e12:.2f} T ({r['peak_flops_source']})"),
        ("MFU / HFU", f"{r['mfu']:.1%} / {r['hfu']:.1%}"),
        ("peak memory", f"{r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_kind']})"),
    ]
    return "\n".join(f"{k:<20}{v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    from train.distributed import destroy_distributed, init_distributed

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    dist = None
    try:
        try:
            overrides, opts = split_overrides(argv)
            cfg = compose_config(overrides)
            from train.config import resolve
            from train.distributed import env_rank_info

            resolve(cfg, env_rank_info()[2])  # dims, model: one-line errors before any process group work
            dist = init_distributed(cfg.train.device, cfg.strategy.backend, cfg.strategy.timeout_s)
            if dist.device.type == "cpu":  # as the trainer does (train/cpu_malloc.py)
                from train.cpu_malloc import tune_glibc_malloc

                tune_glibc_malloc()
        except ValueError as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        result = run_bench(cfg, opts["steps"], opts["warmup"], opts["data"], dist)
        if dist.is_main:
            print(format_table(result), file=sys.stderr)
            print(json.dumps(result))
        return 0
    finally:
        if dist is not None:
            destroy_distributed()


if __name__ == "__main__":
    raise SystemExit(main())
