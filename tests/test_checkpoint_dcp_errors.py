"""Checkpoints that do not fit, read by train.export and by the native engine's resume (fsdp, single): DCP's
failure (a BaseException carrying every rank's traceback) becomes one line naming the tensor (or the exception
type when it has no message); export's model.pt reader falls back from mmap for a legacy file and names a
truncated one; a run config.yaml that is not a mapping is ignored; a DCP checkpoint without its .metadata index
is one line of ours (torch versions word DCP's own error differently). In-process, one rank, tiny models:
about 3 s together."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from model import GPT, GPTConfig
from train.checkpoint import CheckpointError, write_meta


def _config(**overrides) -> GPTConfig:
    kw = {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 96, "block_size": 16, **overrides}
    return GPTConfig.from_name("gpt2-tiny", **kw)


def _dcp_checkpoint(ckpt: Path, saved: GPTConfig, claimed: GPTConfig) -> None:
    """A DCP checkpoint of a `saved` model whose meta.json claims `claimed`."""
    torch.manual_seed(0)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": GPT(saved).state_dict()}, checkpoint_id=str(ckpt), no_dist=True)
    write_meta(ckpt, format="dcp", step=1, strategy="fsdp", world_size=1, model_config=claimed.to_dict())


def _assert_names_tensor_and_shapes(msg: str, prefix: str, saved: str, current: str) -> None:
    """Our one line: ``prefix`` + DCP's reason, which must name the tensor in full and the saved shape before the
    current one (torch words the rest differently across versions), closed by ``)``."""
    assert "\n" not in msg and msg.startswith(prefix) and msg.endswith(")"), msg
    reason = msg[len(prefix):-1]
    assert re.search(r"(?<![\w.])model\.tok_emb\.weight(?![\w.])", reason), msg
    assert re.search(re.escape(saved) + r".*" + re.escape(current), reason), msg


def test_export_dcp_shards_that_do_not_fit_are_one_line(tmp_path: Path) -> None:
    from train.export import load_full_state_dict

    ckpt = tmp_path / "step_0000001"
    _dcp_checkpoint(ckpt, _config(), _config(vocab_size=100))
    with pytest.raises(CheckpointError) as err:
        load_full_state_dict(ckpt)
    _assert_names_tensor_and_shapes(str(err.value), f"checkpoint {ckpt}: DCP shards do not fit the model in "
                                                    f"meta.json (", "[96, 32]", "[100, 32]")
    (ckpt / ".metadata").unlink()
    with pytest.raises(CheckpointError) as err:
        load_full_state_dict(ckpt)
    assert str(err.value) == (f"checkpoint {ckpt}: the DCP index .metadata is missing (an incomplete or damaged "
                              f"checkpoint; its shards cannot be read without it)")


@pytest.mark.parametrize("strategy", ["fsdp", "single"])
def test_engine_resume_of_shards_that_do_not_fit_is_one_line(tmp_path: Path, strategy: str) -> None:
    """NativeEngine.load at world size 1 (fsdp: its private 1-rank group; single: no group) on another
    model's DCP checkpoint."""
    from helpers import build_engine_of, make_cfg

    from train.distributed import DistInfo

    ckpt = tmp_path / "step_0000001"
    _dcp_checkpoint(ckpt, _config(n_embd=64), _config(n_embd=64))
    meta = {"format": "dcp", "strategy": "fsdp", "world_size": 1}
    created_group = not dist.is_initialized()
    try:
        cfg = make_cfg(strategy__name=strategy, model__n_layer=1, model__n_embd=32, model__n_head=2,
                       model__vocab_size=96, model__block_size=16, train__seq_len=16, train__device="cpu")
        engine = build_engine_of(cfg, DistInfo())
        assert engine.spec.gpt_config == _config() and engine.dims.fsdp == (strategy == "fsdp")
        with pytest.raises(CheckpointError) as err:
            engine.load(ckpt, meta)
        (ckpt / ".metadata").unlink()  # a checkpoint whose DCP index is gone
        with pytest.raises(CheckpointError) as no_index:
            engine.load(ckpt, meta)
    finally:
        if created_group and dist.is_initialized():
            dist.destroy_process_group()
    _assert_names_tensor_and_shapes(str(err.value), f"checkpoint {ckpt} does not fit this model/optimizer (",
                                    "[96, 64]", "[96, 32]")
    assert str(no_index.value) == (f"checkpoint {ckpt}: the DCP index .metadata is missing (an incomplete or damaged "
                                   f"checkpoint; its shards cannot be read without it)")


def test_dcp_failure_line_names_an_exception_without_a_message() -> None:
    """A garbage / truncated shard fails inside DCP with a bare EOFError: the one line still says so."""
    from train.checkpoint import dcp_failure_line

    e = dcp.CheckpointException("load", {1: (ValueError("second\nline"), None), 0: (EOFError(), None)})
    assert dcp_failure_line(e) == "EOFError"
    e = dcp.CheckpointException("load", {1: (EOFError(), None), 0: (ValueError("bad\n  shape"), None)})
    assert dcp_failure_line(e) == "bad shape"


def test_export_reads_legacy_model_pt_and_names_a_truncated_one(tmp_path: Path) -> None:
    from train.export import load_full_state_dict

    cfg = _config()
    torch.manual_seed(0)
    sd = GPT(cfg).state_dict()
    ckpt = tmp_path / "step_0000001"
    ckpt.mkdir()
    write_meta(ckpt, format="torch", step=1, strategy="single", world_size=1, model_config=cfg.to_dict())
    torch.save(sd, ckpt / "model.pt", _use_new_zipfile_serialization=False)  # mmap refuses this format
    got, meta = load_full_state_dict(ckpt)
    assert meta["format"] == "torch" and got.keys() == sd.keys()
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    torch.save(sd, ckpt / "model.pt")
    data = (ckpt / "model.pt").read_bytes()
    (ckpt / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"^checkpoint file {re.escape(str(ckpt / 'model.pt'))} is truncated "
                                              r"or not a checkpoint \(.+\)$"):
        load_full_state_dict(ckpt)


@pytest.mark.parametrize(("text", "want"), [
    ("data:\n  tokenizer: cl100k_base\n", {"data": {"tokenizer": "cl100k_base"}}),
    ("- data\n- tokenizer\n", None),                # a list, not a run config
    ("data: [gpt2\n", None),                        # malformed YAML
    ("data:\n\ttokenizer: gpt2\n", None),           # a tab: YAML's scanner refuses it
    ("3\n", None),                                  # OmegaConf refuses a scalar document
])
def test_export_run_config_that_is_not_a_mapping_is_ignored(tmp_path: Path, text: str, want: dict | None) -> None:
    from train.export import _run_config

    ckpt = tmp_path / "run" / "checkpoints" / "step_0000001"
    ckpt.mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text(text)
    assert _run_config(ckpt) == want
