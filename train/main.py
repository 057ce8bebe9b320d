"""Hydra entry point: ``python -m train [overrides]`` (also under torchrun / deepspeed / srun).

Order of work: compose + type-check the config (Hydra) -> validate and resolve it (train/config.py: model,
parallel dims, tokenizer; ``cfg`` is never written) -> join the process group -> build data and the
parallel model (train/parallel) -> resume -> write config.yaml -> train. Everything a user
can get wrong is reported before the first forward pass as one line ``error: ...`` on stderr with
exit code 2, and a run dir that this invocation created is removed again. Later failures are sorted into
the other exit codes of train/ops/errors.py: an unexpected exception is exit 1 with one line on the
console, the traceback in ``<run.dir>/error.txt``, and the run dir and its checkpoints kept.
"""

from __future__ import annotations

import errno
import logging
import re
import shutil
import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from train.config import ConfigError, RunSpec, resolve  # importing train.config registers the schema
from train.ops.errors import (
    EXIT_DIST,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_STORAGE,
    EXIT_USAGE,
    STORAGE_ERRNOS,
    StorageError,
    WandbStartError,
    write_error_file,
)
from train.ops.lock import LOCK_FILE

log = logging.getLogger("train")

REPO = Path(__file__).resolve().parent.parent


def _remove_new_run_dir(run_dir: Path, created: bool) -> None:
    """Undo the run dir Hydra made for an invocation that failed before writing anything useful."""
    if not created or not run_dir.exists():
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    parent, stop = run_dir.parent, Path.cwd().resolve()
    while parent.resolve() != stop and parent.exists() and not any(parent.iterdir()):
        parent.rmdir()  # e.g. runs/<date>/ left empty
        parent = parent.parent


def _setup_logging(is_main: bool) -> None:
    logging.getLogger("train").setLevel(logging.INFO if is_main else logging.WARNING)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)


def run(cfg: DictConfig, run_dir: Path) -> int:
    """Validate, build and train; returns the exit code (train/ops/errors.py: 0 done, 1 internal error,
    2 bad input, 3 NaN / spikes, 4 collective or hang, 5 storage, 75 preempted, 130 interrupted)."""
    from train.distributed import env_rank_info
    from train.ops.lock import RunDirLock, RunDirLocked

    rank, _, _ = env_rank_info()
    _setup_logging(rank == 0)
    run_dir = Path(run_dir).absolute()
    created = (rank == 0 and not any(p.name not in (".hydra", LOCK_FILE) for p in run_dir.glob("*"))
               if run_dir.exists() else True)
    lock = RunDirLock(run_dir)
    if rank == 0:
        try:
            lock.acquire()
        except RunDirLocked as e:  # the dir is another live run's: never remove anything of it
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return EXIT_USAGE
        except OSError as e:
            print(f"error: run.dir {run_dir} cannot be written ({_one_line(e)})", file=sys.stderr)
            return EXIT_STORAGE if getattr(e, "errno", None) in STORAGE_ERRNOS else EXIT_USAGE
    try:
        return _run(cfg, run_dir, rank, created)
    finally:
        lock.release()


def _run(cfg: DictConfig, run_dir: Path, rank: int, created: bool) -> int:
    import dataclasses

    import torch

    from train.checkpoint import list_checkpoints, resolve_resume
    from train.distributed import destroy_distributed, env_rank_info, init_distributed

    _, _, world = env_rank_info()
    dist = None
    phase = "validate"
    try:
        # ---- input validation: nothing is built or written before this passes
        try:
            spec = resolve(cfg, world)  # config values, model, parallel dims, tokenizer name
            from train.parallel import check_environment

            check_environment(cfg)  # launcher, deepspeed, bf16/fp16 support
            from train.metrics import wandb_key_problem

            problem = wandb_key_problem(cfg)
            if problem is not None:
                raise ConfigError(problem)
            if spec.dims.engine == "deepspeed":
                from train.parallel.deepspeed import validate_deepspeed_config

                validate_deepspeed_config(cfg, world)
            resume_from = resolve_resume(cfg.resume, run_dir)
            own = list_checkpoints(run_dir)
            ours = resume_from is not None and resume_from.parent.parent.resolve() == run_dir.resolve()
            if own and not ours:
                raise ConfigError(f"run dir {run_dir} already holds checkpoints; resume=auto continues it, "
                                  f"or choose a new run.dir (resume={cfg.resume} would overwrite them)")
            earlier = [f for f in ("metrics.jsonl", "config.yaml") if (run_dir / f).is_file()]
            if earlier and not ours:
                raise ConfigError(f"run dir {run_dir} holds {' and '.join(earlier)} of an earlier run but no checkpoint "
                                  f"of it to resume (resume={cfg.resume}); choose a new run.dir, or delete them to "
                                  f"start over in this one")
            if resume_from is not None:
                _check_resume_compatible(resume_from, spec.gpt_config)
            dist = init_distributed(cfg.train.device, cfg.strategy.backend, cfg.strategy.timeout_s)
            if dist.device.type == "cpu":  # before the data workers fork: they inherit it
                from train.cpu_malloc import tune_glibc_malloc

                tune_glibc_malloc()
            train_loader, val_loader, tok = _build_data(cfg, spec, dist)
        except (ValueError, OSError) as e:  # ConfigError, CheckpointError, DataError, GPTConfig checks
            print(f"error: {_one_line(e)}", file=sys.stderr)
            if rank == 0:
                _remove_new_run_dir(run_dir, created)
            return EXIT_USAGE

        from train.parallel import build_engine
        from train.trainer import Trainer

        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        phase = "build"
        try:
            # resuming: the checkpoint's weights replace the start, so model.init_from is not loaded first
            build_spec = dataclasses.replace(spec, init_from=None) if resume_from is not None else spec
            engine = build_engine(cfg, build_spec, dist)
            trainer = Trainer(cfg, spec, run_dir, dist, engine, tok, train_loader, val_loader)
            if resume_from is not None:  # now, so a bad checkpoint fails before config.yaml is touched
                trainer.resume(resume_from)
        except (ValueError, OSError) as e:
            if not _is_input_error(e):
                raise
            print(f"error: {_one_line(e)}", file=sys.stderr)
            if rank == 0:
                _remove_new_run_dir(run_dir, created)
            return EXIT_USAGE
        phase = "train"
        if dist.is_main:
            resolved = spec.resolved_config(cfg)
            resolved["run"]["dir"] = str(run_dir)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
            model_name = cfg.model.preset if spec.init_from is None else f"from {spec.init_from}"
            log.info(f"run dir {run_dir} | model {model_name} ({engine.n_params / 1e6:.2f}M params) | strategy "
                     f"{cfg.strategy.name} x{dist.world_size} ({spec.dims.describe()}) on {dist.device} | "
                     f"precision {cfg.precision.name}")
        return trainer.fit()
    except StorageError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_STORAGE
    except WandbStartError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C before the loop's handler is installed, or a second one inside it
        what = "interrupted twice (Ctrl-C): stopped at once" if phase == "train" else f"interrupted during {phase}"
        print(f"error: {what}, nothing saved since the latest checkpoint: {_latest_name(run_dir)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - sorted into the documented exit codes below
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            where = e.filename or run_dir
            print(f"error: cannot write {where}: {(e.strerror or str(e)).lower()} (errno {errno.errorcode.get(e.errno)}); "
                  f"latest checkpoint: {_latest_name(run_dir)}", file=sys.stderr)
            return EXIT_STORAGE
        if dist is not None and dist.enabled and isinstance(e, RuntimeError) and _is_comm_error(e):
            print(f"error: rank {rank}: a collective failed or timed out (strategy.timeout_s="
                  f"{cfg.strategy.timeout_s}): {_one_line(e)}", file=sys.stderr)
            return EXIT_DIST
        path = write_error_file(run_dir, rank, e)
        if path is None:
            traceback.print_exception(e)
        where = f"full traceback in {path}" if path is not None else "traceback above"
        if isinstance(e, torch.OutOfMemoryError):
            from train.ops.profiler import dump_oom_snapshot

            snap = dump_oom_snapshot(run_dir, rank)
            where += f"; CUDA memory snapshot in {snap}" if snap is not None else ""
        print(f"error: internal error during {phase} on rank {rank}: {type(e).__name__}: {_one_line(e, 300)} "
              f"({where}; run dir and checkpoints kept)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if dist is not None:
            destroy_distributed()


def _latest_name(run_dir: Path) -> str:
    from train.checkpoint import latest_checkpoint

    try:
        latest = latest_checkpoint(run_dir)
    except (ValueError, OSError):
        return "unreadable"
    return str(latest) if latest is not None else "none"


def _is_input_error(e: Exception) -> bool:
    """A ValueError / OSError while building is the user's (exit 2) when it is one of our typed validation errors
    or was raised by lmforge's own code (model/, train/: its checks, a file it opens); raised inside torch or
    DeepSpeed, or a full / read-only disk, it is not."""
    from train.checkpoint import CheckpointError, CheckpointSaveError
    from train.data.errors import DataError

    if isinstance(e, CheckpointSaveError) or (isinstance(e, OSError) and e.errno in STORAGE_ERRNOS):
        return False
    if isinstance(e, ConfigError | CheckpointError | DataError):
        return True
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return False
    origin = Path(frames[-1].filename).resolve()
    return type(e) in (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) and any(
        origin.is_relative_to(REPO / d) for d in ("model", "train"))


def _check_resume_compatible(ckpt: Path, gpt_config) -> None:
    """Compare the checkpoint's model with this run's before building anything: both are built
    on the ``meta`` device (no memory), so a shape mismatch names the tensor and both shapes."""
    import torch

    from model import GPT, GPTConfig
    from train.checkpoint import CheckpointError, check_shapes, read_meta

    saved = read_meta(ckpt)["model_config"]
    try:
        saved_cfg = GPTConfig.from_dict(saved)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: meta.json has an invalid model config ({_one_line(e)})") from None
    with torch.device("meta"):
        ours_sd, saved_sd = GPT(gpt_config).state_dict(), GPT(saved_cfg).state_dict()
    check_shapes({k: v.shape for k, v in ours_sd.items()}, saved_sd, f"checkpoint {ckpt}")
    ours = gpt_config.to_dict()
    diff = [k for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)]
    if diff:
        k = diff[0]
        raise CheckpointError(f"checkpoint {ckpt} is for a different model: {k}={saved.get(k)!r} there, "
                              f"{ours.get(k)!r} here ({len(diff)} field(s) differ)")


def _build_data(cfg: DictConfig, spec: RunSpec, dist):
    """Loaders keyed by the data-parallel rank: every tensor-parallel rank of a replica reads the same samples."""
    from train.data import build_dataloader, get_tokenizer

    data_cfg = OmegaConf.to_object(cfg.data)
    data_cfg.tokenizer = spec.tokenizer  # this run's resolved choice (a copy: cfg itself is not written)
    tok = get_tokenizer(spec.tokenizer)
    vocab = spec.gpt_config.vocab_size
    if tok.n_vocab > vocab:
        raise ConfigError(f"the tokenizer {spec.tokenizer!r} has {tok.n_vocab} tokens but model.vocab_size="
                          f"{vocab}; use a model with vocab_size >= {tok.n_vocab}")
    t = cfg.train
    kw = {"seq_len": t.seq_len, "micro_batch_size": t.micro_batch_size, "dp_rank": spec.dims.dp_rank(dist.rank),
          "dp_size": spec.dims.dp_size, "seed": t.seed}
    train_loader = build_dataloader(data_cfg, tok, split="train", grad_accum=t.grad_accum, **kw)
    val_loader = build_dataloader(data_cfg, tok, split="val", grad_accum=1, **kw) if t.eval_steps > 0 else None
    return train_loader, val_loader, tok


def _is_comm_error(e: BaseException) -> bool:
    import torch.distributed

    if isinstance(e, torch.distributed.DistError):
        return True
    text = str(e)
    return any(s in text for s in ("gloo", "NCCL", "Timed out", "timed out", "Connection closed by peer",
                                   "ProcessGroup", "Watchdog"))


def _one_line(e: BaseException, limit: int = 400) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


# the repo's conf/ by absolute path (a relative one would be looked up as a Python package under -m)
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    code = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    if code != 0:
        sys.exit(code)


def _hydra_error_line(e: BaseException) -> str:
    """Hydra's composition error (and its cause) as one line, without the search-path dump."""
    parts: list[str] = []
    while e is not None and len(parts) < 3:
        text = str(e).split("Config search path:")[0]
        lines = [ln for ln in text.splitlines() if ln.strip() and "HYDRA_FULL_ERROR" not in ln]
        options = [ln.strip() for ln in lines if ln.startswith("\t")]  # "Available options" list
        text = " ".join(ln.strip() for ln in lines if not ln.startswith("\t"))
        if options:
            text += " " + ", ".join(options)
        text = re.sub(r"\s*(reference_type|object_type)=\S+", "", text).strip()
        if text and text not in parts:
            parts.append(text)
        e = e.__cause__
    return "; ".join(parts)


def precheck(args: list[str]) -> str | None:
    """Compose the config once with the CLI overrides (no run dir, no work) so a typo, a wrong
    type or an unknown group option is reported as one line. Flags (-m, --cfg, ...) and hydra.*
    overrides are left to Hydra itself."""
    if any(a.startswith("-") for a in args):
        return None
    overrides = [a for a in args if not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
            run_dir = str(cfg.run.dir)
    except Exception as e:  # noqa: BLE001 - every composition error is a user error here
        return _hydra_error_line(e)
    return run_dir_problem(run_dir)


def run_dir_problem(run_dir: str) -> str | None:
    """Why ``run.dir`` cannot be created (a path through an existing file, a read-only parent), else None:
    checked before Hydra tries to make it."""
    import os

    p = Path(run_dir).expanduser().absolute()
    if p.exists() and not p.is_dir():
        return f"run.dir={run_dir} is an existing file, not a directory; choose another run.dir"
    parent = p
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"run.dir={run_dir} goes through {parent}, which is a file, not a directory; choose another run.dir"
    if parent != p and not os.access(parent, os.W_OK | os.X_OK):
        return f"run.dir={run_dir} cannot be created: {parent} is not writable; choose another run.dir"
    return None


def cli() -> None:
    """``python -m train``. Under a multi-process launcher every rank must use the same run dir:
    the default ``runs/<date>/<time>`` is derived from rank 0's clock (shared through the job's
    rendezvous store) unless ``run.dir`` is given."""
    from train.distributed import env_rank_info, shared_timestamp

    _, _, world = env_rank_info()
    args = sys.argv[1:]
    problem = precheck(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    if world > 1 and not any(a.split("=", 1)[0].lstrip("+~") in ("run.dir", "hydra.run.dir") for a in args):
        stamp = time.localtime(shared_timestamp())
        sys.argv.append(f"run.dir=runs/{time.strftime('%Y-%m-%d', stamp)}/{time.strftime('%H-%M-%S', stamp)}")
    main()
