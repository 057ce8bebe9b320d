"""data.document_mask=true (model/gpt.py `doc_mask_token`): a packed sequence of three documents gives each
document the logits it gets alone (gpt2-tiny: learned positions restart; llama-tiny: RoPE positions restart),
with or without activation checkpointing (same loss and gradients); a trainer run with it lowers the val loss
on the bundled corpus; a tokenizer without an end-of-text token is a one-line error."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY, read_metrics, train_in_process

from model import GPT, GPTConfig
from model.gpt import document_layout

EOT, VOCAB = 511, 512  # the models' end-of-text id; a small vocabulary keeps the tests fast


def _docs(lengths=(7, 12, 5), seed=1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.randint(0, EOT, (n,), generator=g), torch.tensor([EOT])]) for n in lengths]


def _models(preset: str) -> tuple[GPT, GPT]:
    torch.manual_seed(0)
    masked = GPT(GPTConfig.from_name(preset, n_layer=2, vocab_size=VOCAB, doc_mask_token=EOT)).eval()
    plain = GPT(GPTConfig.from_name(preset, n_layer=2, vocab_size=VOCAB)).eval()
    plain.load_state_dict(masked.state_dict())
    return masked, plain


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_packed_documents_equal_each_document_alone(preset):
    masked, plain = _models(preset)
    docs = _docs()
    packed = torch.cat(docs)[None]  # (1, 27): three documents, each ending in EOT
    with torch.no_grad():
        alone = torch.cat([masked(d[None])[0] for d in docs])  # each document from position 0
        got = masked(packed)[0]
        crossed = plain(packed)[0]
        # a batch of two packings (boundaries at different places per row) is masked row by row
        other = torch.cat([docs[2], docs[0], docs[1]])[None]
        both = masked(torch.cat([packed, other]))
    assert (got - alone).abs().max() < 1e-5
    assert (crossed - alone).abs().max() > 1e-2  # without the mask the later documents see the earlier ones
    assert (both[0] - got).abs().max() < 1e-5
    assert (both[1] - torch.cat([alone[21:], alone[:21]])).abs().max() < 1e-5  # lengths 8, 13, 6
    # the plain model is the masked one on a single document
    with torch.no_grad():
        assert (plain(docs[1][None]) - masked(docs[1][None])).abs().max() < 1e-6


def test_positions_restart_after_each_eot():
    idx = torch.tensor([[5, EOT, 6, 7, EOT, EOT, 8], [1, 2, 3, 4, 5, 6, 7]])
    pos, mask = document_layout(idx, EOT)
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0, 0], [0, 1, 2, 3, 4, 5, 6]]
    assert mask.shape == (2, 1, 7, 7)
    assert mask[0, 0, 3].tolist() == [False, False, True, True, False, False, False]
    assert torch.equal(mask[1, 0], torch.tril(torch.ones(7, 7, dtype=torch.bool)))


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_loss_and_gradients(mode):
    from train.parallelize import apply_ac

    masked, _ = _models("llama-tiny")
    masked.train()
    other, _ = _models("llama-tiny")
    other.train()
    apply_ac(other, mode)
    docs = _docs((9, 20, 30))
    x = torch.stack([torch.cat(docs)[:-1], torch.cat(docs[::-1])[:-1]])  # (2, 61)
    y = torch.stack([torch.cat(docs)[1:], torch.cat(docs[::-1])[1:]])
    la, lb = masked(x, targets=y), other(x, targets=y)
    la.backward()
    lb.backward()
    assert abs(la.item() - lb.item()) < 1e-6
    for (name, a), b in zip(masked.named_parameters(), other.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-5), name


def test_training_with_document_mask_lowers_val_loss(tmp_path):
    code, run_dir = train_in_process(tmp_path / "run", *TINY, "data.document_mask=true", "train.max_steps=14",
                                     "train.eval_steps=2", "optim.lr=6e-3")
    assert code == 0
    val = [e["val_loss"] for e in read_metrics(run_dir) if "val_loss" in e]
    assert len(val) == 2 and val[-1] < val[0] - 1.0, val  # 10.8 (ln 50257) -> 9.5 in 14 steps
    import json

    meta = json.loads(next((run_dir / "checkpoints").glob("step_*/meta.json")).read_text())
    assert meta["model_config"]["doc_mask_token"] == 50256  # the gpt2 tokenizer's <|endoftext|>


def test_tokenizer_without_end_of_text_is_one_line_error(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    code, run_dir = train_in_process(tmp_path / "run", *TINY, "data.document_mask=true",
                                     f"data.tokenizer={tmp_path / 'tok'}")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: data.document_mask=true needs the tokenizer's end-of-text token") and "tok" in err
    assert not (run_dir / "checkpoints").exists()


def test_bad_doc_mask_token():
    with pytest.raises(ValueError, match=r"doc_mask_token=70000 must be a token id in \[0, vocab_size=50257\)"):
        GPTConfig.from_name("gpt2-tiny", doc_mask_token=70000)
