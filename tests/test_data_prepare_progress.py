"""`python -m train.prepare`'s progress bar: tokens/s and an ETA, its total estimated from the documents read so far
(tqdm, rendered into a buffer as on a terminal)."""

from __future__ import annotations

import io
import json
import re

import tqdm.auto

from train.data import shards
from train.prepare import main as prepare_main


def test_progress_bar_shows_tokens_per_second_and_eta(tmp_path, monkeypatch):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document {i}: " + "word " * 200}) + "\n" for i in range(60)))
    monkeypatch.setattr(shards, "_GROUP_CHARS", 5_000)  # several tokenizer groups: the ETA is re-estimated
    out, bars = io.StringIO(), []

    class Recorded(tqdm.std.tqdm):  # the real tqdm, drawn into a buffer as on a terminal
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": False, "file": out, "mininterval": 0, "ascii": True})
            bars.append(self)

        def refresh(self, *args, **kwargs):
            self.totals = [*getattr(self, "totals", []), self.total]
            return super().refresh(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorded)
    assert prepare_main(["--source", "text", "--path", str(corpus), "--out", str(tmp_path / "tok"),
                         "--val-fraction", "0.1"]) == 0
    train = next(b for b in bars if b.desc == "tokenize train")
    n_final = shards.TokenStore(tmp_path / "tok", "train").n_tokens - 54  # the bar counts tokens, not the EOTs
    assert train.n == n_final
    estimates = [t for t in train.totals if t]
    assert len(estimates) >= 3  # re-estimated per group
    assert abs(estimates[0] - n_final) < 0.1 * n_final  # the first estimate is already close (similar documents)
    text = out.getvalue()
    assert re.search(r"tokenize train: .*tok/s", text) and re.search(r"<\d\d:\d\d", text), text[-500:]
