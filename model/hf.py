"""Hugging Face checkpoints in and out: `GPT.from_pretrained` and `model.save_pretrained`.

Loading validates names and shapes from the file headers before reading any tensor data, builds the model on
`meta` and assigns the converted tensors shard by shard, so peak memory stays near one copy of the weights.
Saving writes config.json + (sharded) safetensors that `transformers.AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from model.hf_convert import (
    config_from_hf,
    config_to_hf,
    hf_param_shapes,
    normalize_hf_key,
    state_dict_from_hf,
    state_dict_to_hf,
)

if TYPE_CHECKING:  # pragma: no cover
    from model.config import GPTConfig
    from model.gpt import GPT

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_HUB_PATTERNS = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "vocab.json",
                 "merges.txt", "*.model"]


# ---- loading --------------------------------------------------------------------------------------


def resolve_dtype(torch_dtype: torch.dtype | str | None, hf_config: dict[str, Any],
                  first_tensor_dtype: torch.dtype | None) -> torch.dtype:
    """None -> torch's default dtype (fp32); "auto" -> the checkpoint's dtype (config.json, else the first
    floating tensor), as transformers does; a torch.dtype or its name."""
    if torch_dtype is None:
        return torch.get_default_dtype()
    if isinstance(torch_dtype, torch.dtype):
        if not torch_dtype.is_floating_point:
            raise ValueError(f"torch_dtype={torch_dtype} is not a floating dtype; use float32, bfloat16 or float16")
        return torch_dtype
    if torch_dtype == "auto":
        name = hf_config.get("torch_dtype") or hf_config.get("dtype")
        if isinstance(name, str) and name.removeprefix("torch.") in _DTYPES:
            return _DTYPES[name.removeprefix("torch.")]
        return first_tensor_dtype or torch.get_default_dtype()
    key = str(torch_dtype).removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"torch_dtype={torch_dtype!r} is not supported; use 'auto', float32, bfloat16 or float16")
    return _DTYPES[key]


def resolve_model_dir(name_or_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                      revision: str | None = None, local_files_only: bool = False) -> Path:
    """A local directory as is; anything else is a Hub repo id, fetched (or found in the cache) by huggingface_hub."""
    path = Path(name_or_dir).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{str(name_or_dir)!r} is a file; from_pretrained needs a model directory or a Hub id")
        return path
    repo_id = str(name_or_dir)
    if repo_id.startswith((".", "/", "~")) or os.sep + os.sep in repo_id or repo_id.count("/") > 1:
        raise ValueError(f"model directory {repo_id!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        kw = {"repo_id": repo_id, "revision": revision, "cache_dir": cache_dir, "local_files_only": local_files_only}
        d = Path(snapshot_download(allow_patterns=[*_HUB_PATTERNS, "*.safetensors", "*.safetensors.index.json"], **kw))
        if not any(d.glob("*.safetensors")):  # older repos only have pytorch_model*.bin
            d = Path(snapshot_download(allow_patterns=[*_HUB_PATTERNS, "pytorch_model*.bin", BIN_INDEX], **kw))
        return d
    except Exception as e:  # offline, unknown repo, gated repo: one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{repo_id!r} is not a local directory and could not be fetched from the Hugging Face Hub "
                         f"({type(e).__name__}: {first})") from e


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files: sharded or single safetensors, else sharded or single pytorch_model.bin."""
    for index_name, single in ((SAFE_INDEX, SAFE_WEIGHTS), (BIN_INDEX, BIN_WEIGHTS)):
        index = model_dir / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index} has no weight_map")
            files = [model_dir / f for f in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.is_file():
                    raise ValueError(f"missing shard file {f.name} (listed in {index_name}) in {model_dir}")
            return files
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise ValueError(f"no weights in {model_dir}: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX}")


def _file_shapes(f: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype]]:
    """Names, shapes and dtypes of one weight file (safetensors: headers only, no tensor data read)."""
    if f.suffix == ".safetensors":
        shapes, dtypes = {}, {}
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                sl = st.get_slice(k)
                shapes[k] = tuple(sl.get_shape())
                dtypes[k] = _ST_DTYPES.get(sl.get_dtype(), torch.float32)
        return shapes, dtypes
    sd = _load_bin(f)
    return {k: tuple(v.shape) for k, v in sd.items()}, {k: v.dtype for k, v in sd.items()}


_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _load_bin(f: Path) -> dict[str, Tensor]:
    try:
        return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
        return torch.load(f, map_location="cpu", weights_only=True)


def _read_file(f: Path) -> Iterator[tuple[str, Tensor]]:
    if f.suffix == ".safetensors":
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for k in st.keys():  # noqa: SIM118
                yield k, st.get_tensor(k)
    else:
        yield from _load_bin(f).items()


def check_checkpoint(files: list[Path], cfg: GPTConfig) -> torch.dtype | None:
    """Names and shapes of the checkpoint against cfg, before any data is loaded. Returns the first floating dtype."""
    expected = hf_param_shapes(cfg)
    seen: dict[str, tuple[int, ...]] = {}
    first_dtype = None
    unexpected = []
    for f in files:
        shapes, dtypes = _file_shapes(f)
        for k, shape in shapes.items():
            key = normalize_hf_key(k, cfg)
            if key is None:
                continue
            if key not in expected:
                unexpected.append(k)
                continue
            if shape != expected[key]:
                raise ValueError(f"shape mismatch for {k} in {f.name}: checkpoint {list(shape)}, config.json "
                                 f"implies {list(expected[key])}")
            seen[key] = shape
            if first_dtype is None and dtypes[k].is_floating_point:
                first_dtype = dtypes[k]
    if unexpected:
        raise ValueError(f"unexpected keys in the checkpoint for a {cfg.family} model: {_short(unexpected)}")
    missing = [k for k in expected if k not in seen and not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing:
        raise ValueError(f"missing keys in the checkpoint for a {cfg.family} model: {_short(missing)}")
    return first_dtype


def _short(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    f = model_dir / "config.json"
    if not f.is_file():
        raise ValueError(f"no config.json in {model_dir}")
    return json.loads(f.read_text())


def from_pretrained(name_or_dir: str | os.PathLike, torch_dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None, cache_dir: str | os.PathLike | None = None,
                    low_cpu_mem_usage: bool = True, revision: str | None = None,
                    local_files_only: bool = False) -> GPT:
    """Load a Hugging Face gpt2 / falcon / gemma / llama checkpoint into a GPT (in eval mode, like transformers).

    torch_dtype: None = fp32 (torch's default dtype), "auto" = the checkpoint's dtype, or a dtype / its name.
    low_cpu_mem_usage: build on `meta` and assign the loaded tensors (one copy of the weights); False builds and
    initialises the model first, then copies the weights in.
    """
    from model.gpt import GPT

    model_dir = resolve_model_dir(name_or_dir, cache_dir, revision, local_files_only)
    hf_config = read_hf_config(model_dir)
    cfg = config_from_hf(hf_config)
    files = weight_files(model_dir)
    first_dtype = check_checkpoint(files, cfg)
    dtype = resolve_dtype(torch_dtype, hf_config, first_dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")

    sd: dict[str, Tensor] = {}
    for f in tqdm(files, desc="loading shards", unit="shard", disable=len(files) < 2):
        # one shard at a time: convert, cast and move before reading the next
        shard = dict(_read_file(f))
        for k, t in state_dict_from_hf(shard, cfg).items():
            sd[k] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        del shard
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    if low_cpu_mem_usage:
        with torch.device("meta"):
            model = GPT(cfg)
        model.load_state_dict(sd, strict=True, assign=True)
        model.tie_weights()
    else:
        with torch.device(device):
            model = GPT(cfg)
        model.to(dtype)
        model.load_state_dict(sd, strict=True)
    model.init_buffers(device)  # RoPE tables in fp32 whatever the weights' dtype; cast at use, as HF does
    return model.eval()


# ---- saving ---------------------------------------------------------------------------------------


def parse_size(size: int | str) -> int:
    """Bytes from an int or '5GB' / '500MB' / '10KB' (powers of 1000) / '5GiB' (powers of 1024), as transformers."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size={size} must be > 0")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"max_shard_size={size!r} is not a size; use bytes (int) or e.g. '5GB', '500MB', '2GiB'")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


def _shards(sd: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    return shards


def save_hf_state_dict(sd: dict[str, Tensor], cfg: GPTConfig, save_directory: str | os.PathLike,
                       max_shard_size: int | str = "5GB", safe_serialization: bool = True) -> Path:
    """Write our state dict `sd` (plain tensors, any device) as a Hugging Face model dir for cfg.family.

    Everything is written into a temporary dir next to the target and moved in file by file once complete, so an
    error never leaves a half-written checkpoint; stale weight files of an earlier save are removed, other files
    (e.g. tokenizer) are kept.
    """
    hf_config = config_to_hf(cfg)  # validates before anything is written
    max_bytes = parse_size(max_shard_size)
    out = Path(save_directory)
    if out.exists() and not out.is_dir():
        raise ValueError(f"save_directory {str(out)!r} exists and is not a directory")
    hf_sd = state_dict_to_hf(sd, cfg)
    if cfg.tie_embeddings:
        hf_sd.pop("lm_head.weight", None)  # transformers re-ties it; safetensors refuses shared storage
    dtype = next(iter(hf_sd.values())).dtype
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    shards = _shards(hf_sd, max_bytes)
    n = len(shards)
    ext = "safetensors" if safe_serialization else "bin"
    stem = "model" if safe_serialization else "pytorch_model"
    names = [f"{stem}.{ext}"] if n == 1 else [f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}" for i in range(n)]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        weight_map = {}
        for name, shard in tqdm(list(zip(names, shards)), desc="writing shards", unit="shard", disable=n < 2):
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in shard.items()}
            if safe_serialization:
                save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            else:
                torch.save(tensors, tmp / name)
            weight_map.update(dict.fromkeys(tensors, name))
            del tensors
        if n > 1:
            total = sum(t.numel() * t.element_size() for t in hf_sd.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / (SAFE_INDEX if safe_serialization else BIN_INDEX)).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        out.mkdir(exist_ok=True)
        new = {p.name for p in tmp.iterdir()}
        stale = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?$")
        for old in out.iterdir():
            if old.is_file() and old.name not in new and stale.fullmatch(old.name):
                old.unlink()
        for name in sorted(new, key=lambda s: s == "config.json"):  # config.json last
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_pretrained(model: GPT, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                    safe_serialization: bool = True) -> Path:
    """config.json + (sharded) safetensors of `model` that transformers' AutoModelForCausalLM loads."""
    return save_hf_state_dict(model.state_dict(), model.config, save_directory, max_shard_size=max_shard_size,
                              safe_serialization=safe_serialization)

