"""A model vocabulary larger than the tokenizer's (padded, or another family's) trains, samples and exports;
a smaller one is a one-line error before training."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import one_line_error, train_in_process

from model import GPT, GPTConfig

SHORT = ("model.n_layer=1", "train.seq_len=32", "train.micro_batch_size=2", "train.max_steps=2", "train.log_every=1",
         "train.eval_every=0", "train.eval_steps=1", "train.ckpt_every=0", "train.sample_tokens=40",
         "train.sample_temperature=1.0", "train.sample_top_k=null", "train.device=cpu", "data=shakespeare")


def test_generate_never_draws_ids_beyond_the_limit():
    """With an untrained 128256-id model and no top-k, most of the mass sits above the limit: every draw of
    a thousand stays below it, and without the limit some do not (the check can fail)."""
    cfg = GPTConfig.from_name("llama-tiny", n_layer=1)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[50257:] += 0.5  # make the padded ids attractive
    idx = torch.tensor([[1, 2, 3]])
    g = torch.Generator().manual_seed(0)
    out = model.generate(idx.repeat(64, 1), 16, temperature=1.0, top_k=None, generator=g, vocab_limit=50257)
    assert int(out[:, 3:].max()) < 50257
    g = torch.Generator().manual_seed(0)
    free = model.generate(idx.repeat(64, 1), 16, temperature=1.0, top_k=None, generator=g)
    assert int(free[:, 3:].max()) >= 50257
    with pytest.raises(ValueError, match=r"^vocab_limit=0 must be in \[1, vocab_size=128256\]$"):
        model.generate(idx, 1, vocab_limit=0)


@pytest.mark.parametrize("preset", ["llama-tiny", "gemma-tiny", "falcon-tiny"])
def test_bigger_model_vocabulary_trains_and_samples_with_gpt2(tmp_path, preset, caplog):
    """Every family's tiny preset (128256 / 256000 / 65024 ids) with the gpt2 tokenizer (50257) on Shakespeare:
    the run (train.main.run, in process) ends with exit 0 and a decoded sample; train.sample decodes from the
    checkpoint through its command line (gemma-tiny)."""
    caplog.set_level(logging.INFO, logger="train")
    code, _ = train_in_process(tmp_path / "run", f"model={preset}", *SHORT)
    assert code == 0, caplog.text[-2000:]
    assert "sample at step 2:" in caplog.text and "text sample failed" not in caplog.text, caplog.text[-2000:]
    if preset != "gemma-tiny":  # the CLI once, on the largest vocabulary (the suite's time budget)
        return
    import subprocess
    import sys

    from helpers import REPO

    sample = subprocess.run([sys.executable, "-m", "train.sample", "--ckpt", str(tmp_path / "run"),
                             "--max-new-tokens", "30", "--top-k", "100000", "--temperature", "1.0"],
                            capture_output=True, text=True, cwd=REPO, check=False)
    assert sample.returncode == 0, sample.stderr[-2000:]


def test_smaller_model_vocabulary_is_one_line_error(tmp_path, capsys):
    code, run_dir = train_in_process(tmp_path / "run", "model=gpt2-tiny", "model.vocab_size=1000", *SHORT)
    assert code == 2
    assert one_line_error(capsys.readouterr().err) == ("error: the tokenizer 'gpt2' has 50257 tokens but "
                                                       "model.vocab_size=1000; use a model with vocab_size >= 50257")
    assert not run_dir.exists()
