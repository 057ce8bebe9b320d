"""``model.init_from=<hf dir or Hub id>``: continued pre-training / fine-tuning from Hugging Face weights.

Three jobs, all checked before any compute: the model config comes from the checkpoint's
``config.json`` (``model.*`` overrides may only repeat it, except ``model.dropout``); the weights'
names and shapes are checked from the file headers; the matching tokenizer is chosen (tiktoken
``gpt2`` for the GPT-2 family, else the checkpoint's own ``tokenizer.json``). The strategy then
builds the model from these weights instead of the random init (``load_hf_model``): single, ddp,
zero1 and zero2 through ``Strategy.init_model`` (a full replica per rank); fsdp and zero3 have rank 0
read the checkpoint and write it into the shards (their ``_load_hf_weights``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from model import GPTConfig

# model.* fields that may differ from the checkpoint's config.json (regularisation, not architecture)
OVERRIDABLE = ("dropout",)


def hf_gpt_config(model_cfg) -> tuple[GPTConfig, Path]:
    """(GPTConfig, local checkpoint dir) for ``model.init_from``; raises ValueError (one line) on bad input.

    ``model_cfg`` is the ``ModelConfig`` dataclass; its ``preset`` is ignored (the checkpoint defines
    the architecture) and every other non-None field must equal the checkpoint's, except ``dropout``.
    """
    from model.hf import check_checkpoint, read_hf_config, resolve_model_dir, weight_files
    from model.hf_convert import config_from_hf

    name = model_cfg.init_from
    if not name or not str(name).strip():
        raise ValueError("model.init_from='' is empty; give a Hugging Face model dir or Hub id")
    try:
        model_dir = resolve_model_dir(name).absolute()
        gpt = config_from_hf(read_hf_config(model_dir))
        check_checkpoint(weight_files(model_dir), gpt)  # names + shapes from the headers only
    except ValueError as e:
        raise ValueError(f"model.init_from={name!r}: {e}") from None
    changes = {}
    for key, value in model_cfg.overrides().items():
        if key in OVERRIDABLE:
            changes[key] = value
        elif getattr(gpt, key) != value:
            raise ValueError(f"model.{key}={value!r} contradicts model.init_from={name!r} ({key}={getattr(gpt, key)!r} "
                             f"in its config.json); only model.{'/'.join(OVERRIDABLE)} can be changed")
    return (dataclasses.replace(gpt, **changes) if changes else gpt), model_dir


def resolve_tokenizer(requested: str, explicit: bool, model_dir: Path, gpt_config) -> str:
    """The tokenizer name for ``get_tokenizer``: an explicitly set ``data.tokenizer`` wins; else tiktoken
    ``gpt2`` for the GPT-2 family (full vocabulary), else the checkpoint's own ``tokenizer.json``."""
    if explicit:
        return requested
    if gpt_config.family == "gpt2" and gpt_config.vocab_size >= 50257:
        return "gpt2"
    if (model_dir / "tokenizer.json").is_file():
        return str(model_dir)
    raise ValueError(f"model.init_from={str(model_dir)!r} has no tokenizer.json and is not a GPT-2 model; "
                     f"set data.tokenizer=<tiktoken name or a dir with tokenizer.json>")


def load_hf_model(gpt_config, model_dir: str | Path, device: torch.device) -> nn.Module:
    """A ``GPT(gpt_config)`` holding the checkpoint's weights in fp32 on ``device`` (one copy in memory:
    the loaded tensors are assigned, not copied). ``gpt_config`` may differ from config.json only in
    non-architectural fields (dropout), so the state dicts match key for key."""
    from model import GPT

    loaded = GPT.from_pretrained(model_dir, torch_dtype=torch.float32, device=device, low_cpu_mem_usage=True)
    with torch.device("meta"):
        model = GPT(gpt_config)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()  # assign gives tok_emb and lm_head separate Parameters over one tensor
    model.init_buffers(device)
    return model.train()
