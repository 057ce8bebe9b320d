"""`python -m train.export`: single (DCP), FSDP2 (DCP, 2 ranks) and ZeRO-3 (2 ranks) checkpoints ->
a Hugging Face dir that transformers loads with our model's logits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO, ckpt, dcp_state, safetensors_header, single_run
from test_fsdp import fsdp_run

transformers = pytest.importorskip("transformers")


def zero_run(stage: int):
    """The ZeRO runs of test_zero.py, imported when called so that only the zero cases need deepspeed."""
    def run(f):
        import test_zero

        return getattr(test_zero, f"zero{stage}_run")(f)

    return run


SOURCES = {"single": single_run, "fsdp": fsdp_run, "zero1": zero_run(1), "zero2": zero_run(2), "zero3": zero_run(3)}


def _our_logits(state: dict, model_config: dict, x: torch.Tensor) -> torch.Tensor:
    from model import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig.from_dict(model_config))
    model.load_state_dict(state, assign=True)
    model.init_buffers("cpu")
    model.tie_weights()
    return model.eval()(x)


@pytest.mark.parametrize("source", list(SOURCES))
def test_export_loads_in_transformers_with_same_logits(tmp_path_factory, tmp_path, source):
    """Every strategy's checkpoint (DCP from single and fsdp, DeepSpeed stages 1, 2, 3; ddp's in test_resume)
    exports to a dir transformers loads, with our logits and the model trained to step 20."""
    from train.export import export, load_full_state_dict

    run = SOURCES[source](tmp_path_factory)
    src = ckpt(run, 20)
    out = export(src, tmp_path / "hf")
    x = torch.randint(0, 90, (2, 24), generator=torch.Generator().manual_seed(1))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        hf_logits = hf(x).logits
        state, meta = load_full_state_dict(src)
        ours = _our_logits(state, meta["model_config"], x)
        # the oracle: the single-process run's own checkpoint at the same step, and the one 10 steps earlier
        single = single_run(tmp_path_factory)
        oracle = _our_logits(dcp_state(ckpt(single, 20))["model"], meta["model_config"], x)
        earlier = _our_logits(dcp_state(ckpt(single, 10))["model"], meta["model_config"], x)
    assert (hf_logits - ours).abs().max().item() < 1e-5  # the conversion is exact
    # and it is the model trained to step 20. Two ranks reduce in another order than one process; 20 Adam
    # steps at lr 3e-3 carry those 1e-7 roundings to 1.4e-4 in the logits (measured, fsdp and zero3; the
    # losses still agree within 1e-5, test_fsdp / test_zero). Step 10's logits are 4.7 away from step 20's,
    # so 1e-3 still tells a checkpoint one save apart.
    assert (hf_logits - oracle).abs().max().item() < 1e-3
    assert (earlier - oracle).abs().max().item() > 1.0
    assert meta["format"] == ("deepspeed" if source.startswith("zero") else "dcp")
    # the run's tokenizer travels with it; config.json points at its end-of-text id
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 0
    run_tok = tmp_path_factory.getbasetemp() / "sharded_data" / "chartok" / "tokenizer.json"  # the run's
    assert (out / "tokenizer.json").read_bytes() == run_tok.read_bytes()
    n_vocab = len(json.loads(run_tok.read_text())["model"]["vocab"])
    assert len(transformers.AutoTokenizer.from_pretrained(out)) == n_vocab


def test_export_cli_errors(tmp_path_factory, tmp_path, capsys):
    """One-line errors, exit 2, nothing written: non-empty out_dir, not a checkpoint. A run dir works
    (its checkpoints/latest), through the real command line."""
    from train.export import main

    src = ckpt(single_run(tmp_path_factory), 20)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("precious")
    assert main([str(src), str(busy)]) == 2
    assert capsys.readouterr().err == f"error: out_dir {busy} exists and is not an empty directory; choose a new one\n"
    assert sorted(x.name for x in busy.iterdir()) == ["keep.txt"]
    assert main([str(tmp_path), str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {tmp_path}: neither a checkpoint dir") and err.count("\n") == 1, err
    assert not (tmp_path / "new").exists()
    p = subprocess.run([sys.executable, "-m", "train.export", str(single_run(tmp_path_factory)), str(tmp_path / "ok"),
                        "--dtype", "bfloat16"], cwd=REPO, capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "step 20" in p.stdout
    # --dtype bfloat16: every tensor is BF16 in the safetensors header, and holds the fp32 weights rounded to bf16
    from train.export import load_full_state_dict

    header = safetensors_header(tmp_path / "ok" / "model.safetensors")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert tensors and {v["dtype"] for v in tensors.values()} == {"BF16"}, {k: v["dtype"] for k, v in tensors.items()}
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "ok" / "model.safetensors")
    state, _ = load_full_state_dict(src)
    hf_wte = exported["transformer.wte.weight"]
    assert hf_wte.dtype == torch.bfloat16 and torch.equal(hf_wte, state["tok_emb.weight"].to(torch.bfloat16))
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["torch_dtype"] == "bfloat16"
