"""Hydra entry point: ``python -m train [overrides]`` (also under torchrun / deepspeed / srun).

Order of work: compose + type-check the config (Hydra) -> validate values -> join the process
group -> build data, model, strategy -> resume -> write config.yaml -> train. Everything a user
can get wrong is reported before the first forward pass as one line ``error: ...`` on stderr with
exit code 2, and a run dir that this invocation created is removed again.
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import train.config  # noqa: F401  (registers the structured config schema)

log = logging.getLogger("train")

EXIT_USAGE = 2  # bad input: config value, data path, checkpoint
EXIT_DIST = 4  # a collective failed or timed out


class ConfigError(ValueError):
    """A config value that cannot work (one-line message naming the key, the value and what is allowed)."""


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: DictConfig) -> None:
    """Value checks that the type system cannot express (no I/O beyond stat, no compute)."""
    t = cfg.train
    for key in ("max_steps", "micro_batch_size", "grad_accum", "seq_len", "log_every"):
        v = t[key]
        _check(v >= 1, f"train.{key}={v} must be an integer >= 1")
    for key in ("eval_every", "eval_steps", "ckpt_every", "sample_every", "sample_tokens", "keep_last"):
        _check(t[key] >= 0, f"train.{key}={t[key]} must be >= 0")
    _check(t.max_nan_skips >= 1, f"train.max_nan_skips={t.max_nan_skips} must be >= 1")
    from train.parallelize import AC_MODES

    _check(t.activation_checkpointing in AC_MODES,
           f"train.activation_checkpointing={t.activation_checkpointing!r} is not one of {', '.join(AC_MODES)}")
    _check(t.device in ("auto", "cpu", "cuda"), f"train.device={t.device!r} is not one of auto, cpu, cuda")
    o = cfg.optim
    _check(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    _check(0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr} must be in [0, optim.lr={o.lr}]")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
           f"optim.betas={list(o.betas)} must be two numbers in [0, 1)")
    _check(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (0 disables clipping)")
    _check(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    _check(cfg.logger.name in ("none", "wandb"), f"logger.name={cfg.logger.name!r} is not one of none, wandb")
    _check(cfg.logger.wandb.mode in ("online", "offline", "disabled"),
           f"logger.wandb.mode={cfg.logger.wandb.mode!r} is not one of online, offline, disabled")
    _check(cfg.precision.name in ("fp32", "bf16", "fp16"),
           f"precision.name={cfg.precision.name!r} is not one of fp32, bf16, fp16")
    from train.strategy import STRATEGIES

    _check(cfg.strategy.name in STRATEGIES, f"strategy.name={cfg.strategy.name!r} is not one of {', '.join(STRATEGIES)}")
    _check(cfg.strategy.timeout_s >= 1, f"strategy.timeout_s={cfg.strategy.timeout_s} must be >= 1")
    _check(cfg.strategy.offload in ("none", "optimizer", "params"),
           f"strategy.offload={cfg.strategy.offload!r} is not one of none, optimizer, params")


def build_gpt_config(cfg: DictConfig):
    """The model config: the named preset with the non-None ``model.*`` fields applied."""
    from model import GPTConfig

    mc = OmegaConf.to_object(cfg.model)
    if mc.init_from is not None:  # the architecture is the Hugging Face checkpoint's (train/init_from.py)
        from train.init_from import hf_gpt_config

        gpt, model_dir = hf_gpt_config(mc)
        cfg.model.init_from = str(model_dir)  # the strategy loads from here; config.yaml records it
        _check(cfg.train.seq_len <= gpt.block_size,
               f"train.seq_len={cfg.train.seq_len} exceeds block_size={gpt.block_size} of model.init_from="
               f"{mc.init_from!r}; use train.seq_len<={gpt.block_size}")
        return gpt
    gpt = GPTConfig.from_name(mc.preset, **mc.overrides())
    _check(cfg.train.seq_len <= gpt.block_size,
           f"train.seq_len={cfg.train.seq_len} exceeds the model's block_size={gpt.block_size} "
           f"(model={mc.preset}); use train.seq_len<={gpt.block_size} or model.block_size=...")
    return gpt


def _tokenizer_name(cfg: DictConfig, gpt_config) -> str:
    """``data.tokenizer``, or with ``model.init_from`` and no explicit choice the checkpoint's tokenizer
    (written back to cfg so config.yaml, sample and export see the one used)."""
    if cfg.model.init_from is None:
        return cfg.data.tokenizer
    from train.init_from import resolve_tokenizer

    explicit = cfg.data.tokenizer != "gpt2"  # not the default; on the CLI even "gpt2" counts as a choice
    if HydraConfig.initialized():
        explicit = explicit or any(o.lstrip("+~").split("=", 1)[0] == "data.tokenizer"
                                   for o in HydraConfig.get().overrides.task)
    name = resolve_tokenizer(cfg.data.tokenizer, explicit, Path(cfg.model.init_from), gpt_config)
    cfg.data.tokenizer = name
    return name


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
    """Validate, build and train; returns the exit code (0 done, 2 bad input, 3 NaN, 75 preempted)."""
    import torch
    import torch.distributed

    from train.checkpoint import list_checkpoints, resolve_resume
    from train.distributed import destroy_distributed, env_rank_info, init_distributed

    rank = env_rank_info()[0]
    _setup_logging(rank == 0)
    run_dir = Path(run_dir).absolute()
    created = rank == 0 and not any(p.name not in (".hydra",) for p in run_dir.glob("*")) if run_dir.exists() else True
    dist = None
    try:
        # ---- input validation: nothing is built or written before this passes
        try:
            validate(cfg)
            from train.strategy import check_environment

            check_environment(cfg)  # launcher, deepspeed, bf16/fp16 support
            gpt_config = build_gpt_config(cfg)
            resume_from = resolve_resume(cfg.resume, run_dir)
            own = list_checkpoints(run_dir)
            if own and (resume_from is None or resume_from.parent.parent.resolve() != run_dir.resolve()):
                raise ConfigError(f"run dir {run_dir} already holds checkpoints; resume=auto continues it, "
                                  f"or choose a new run.dir (resume={cfg.resume} would overwrite them)")
            if resume_from is not None:
                _check_resume_compatible(resume_from, gpt_config)
            dist = init_distributed(cfg.train.device, cfg.strategy.backend, cfg.strategy.timeout_s)
            if dist.device.type == "cpu":  # before the data workers fork: they inherit it
                from train.cpu_malloc import tune_glibc_malloc

                tune_glibc_malloc()
            train_loader, val_loader, tok = _build_data(cfg, gpt_config, dist)
        except (ValueError, OSError) as e:  # ConfigError, CheckpointError, DataError, GPTConfig checks
            print(f"error: {_one_line(e)}", file=sys.stderr)
            if rank == 0:
                _remove_new_run_dir(run_dir, created)
            return EXIT_USAGE

        from train.strategy import build_strategy
        from train.trainer import Trainer

        torch.manual_seed(cfg.train.seed + dist.rank)  # dropout streams differ per rank
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        try:
            strategy = build_strategy(cfg, dist)
            if resume_from is not None:
                strategy.init_from = None  # the checkpoint's weights replace the start: don't load them twice
            strategy.build(gpt_config)
            trainer = Trainer(cfg, run_dir, dist, strategy, tok, train_loader, val_loader)
            if resume_from is not None:  # now, so a bad checkpoint fails before config.yaml is touched
                trainer.resume(resume_from)
        except (ValueError, OSError) as e:
            print(f"error: {_one_line(e)}", file=sys.stderr)
            if rank == 0:
                _remove_new_run_dir(run_dir, created)
            return EXIT_USAGE
        if dist.is_main:
            resolved = OmegaConf.to_container(cfg, resolve=True)
            resolved["run"]["dir"] = str(run_dir)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
            n_params = sum(p.numel() for p in strategy.raw_model.parameters())
            model_name = cfg.model.preset if cfg.model.init_from is None else f"from {cfg.model.init_from}"
            log.info(f"run dir {run_dir} | model {model_name} ({n_params / 1e6:.2f}M params) | strategy "
                     f"{strategy.name} x{dist.world_size} on {dist.device} | precision {cfg.precision.name}")
        return trainer.fit()
    except RuntimeError as e:  # gloo/NCCL failures surface as DistError or plain RuntimeError
        if dist is None or not dist.enabled or not _is_comm_error(e):
            raise
        print(f"error: rank {rank}: a collective failed or timed out (strategy.timeout_s="
              f"{cfg.strategy.timeout_s}): {_one_line(e)}", file=sys.stderr)
        return EXIT_DIST
    finally:
        if dist is not None:
            destroy_distributed()


def _check_resume_compatible(ckpt: Path, gpt_config) -> None:
    """Compare the checkpoint's model with this run's before building anything: both are built
    on the ``meta`` device (no memory), so a shape mismatch names the tensor and both shapes."""
    import torch

    from model import GPT, GPTConfig
    from train.checkpoint import CheckpointError, check_shapes, read_meta
    from train.strategy.base import gpt_config_dict

    saved = read_meta(ckpt)["model_config"]
    try:
        saved_cfg = GPTConfig.from_dict(saved)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: meta.json has an invalid model config ({_one_line(e)})") from None
    with torch.device("meta"):
        ours_sd, saved_sd = GPT(gpt_config).state_dict(), GPT(saved_cfg).state_dict()
    check_shapes({k: v.shape for k, v in ours_sd.items()}, saved_sd, f"checkpoint {ckpt}")
    ours = gpt_config_dict(gpt_config)
    diff = [k for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)]
    if diff:
        k = diff[0]
        raise CheckpointError(f"checkpoint {ckpt} is for a different model: {k}={saved.get(k)!r} there, "
                              f"{ours.get(k)!r} here ({len(diff)} field(s) differ)")


def _build_data(cfg: DictConfig, gpt_config, dist):
    from train.data import build_dataloader, get_tokenizer

    _tokenizer_name(cfg, gpt_config)
    data_cfg = OmegaConf.to_object(cfg.data)
    tok = get_tokenizer(data_cfg.tokenizer)
    if tok.n_vocab > gpt_config.vocab_size:
        raise ConfigError(f"the tokenizer {data_cfg.tokenizer!r} has {tok.n_vocab} tokens but model.vocab_size="
                          f"{gpt_config.vocab_size}; use a model with vocab_size >= {tok.n_vocab}")
    t = cfg.train
    kw = {"seq_len": t.seq_len, "micro_batch_size": t.micro_batch_size, "dp_rank": dist.rank,
          "dp_size": dist.world_size, "seed": t.seed}
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


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 400 else text[:397] + "..."


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
            compose(config_name="config", overrides=overrides)
    except Exception as e:  # noqa: BLE001 - every composition error is a user error here
        return _hydra_error_line(e)
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
