"""On-the-fly tokenization of local corpora: tokenized once, cached as a tokens directory.

The cache entry is exactly what `python -m train.prepare` writes for the same corpus and tokenizer,
keyed by the corpus content fingerprint + tokenizer fingerprint, so both paths give identical batches.
Concurrent builders (ranks of one node) serialise on a file lock; the first one builds, the rest reuse.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from train.data.config import DataConfig
from train.data.documents import Corpus, shakespeare_corpus, text_corpus
from train.data.errors import DataError
from train.data.shards import INDEX, write_tokens
from train.data.tokenizer import Tokenizer


def cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("LMFORGE_CACHE") or "~/.cache/lmforge"
    return Path(os.path.expanduser(root))


def corpus_for(cfg: DataConfig) -> Corpus:
    """The document corpus of an indexed text source (shakespeare | text)."""
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.source == "shakespeare":
        return shakespeare_corpus(cfg.val_fraction)
    if cfg.source == "text":
        return text_corpus(cfg.path, cfg.text_field, cfg.val_fraction)
    raise DataError(f"data.source={cfg.source!r} is not a local text corpus (shakespeare, text)")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def prepare_corpus(corpus: Corpus, tok: Tokenizer, out: Path, *, shard_tokens: int = 50_000_000,
                   num_threads: int = 4, progress: bool = True) -> dict:
    """Tokenize `corpus` (train and val splits) into the tokens directory `out`."""
    splits = {"train": lambda: corpus.documents("train")}
    if corpus.val_fraction > 0:
        splits["val"] = lambda: corpus.documents("val")
    expected = {s: corpus.expected_documents(s) for s in splits} if progress else None  # the bar's ETA
    header = write_tokens(out, splits, tok, fingerprint=corpus.fingerprint, source=corpus.describe(),
                          shard_tokens=shard_tokens, num_threads=num_threads, progress=progress,
                          expected_docs=expected)
    if header["splits"]["train"]["n_docs"] == 0:  # an empty val split is reported when a val loader asks
        raise DataError(corpus.empty_error())
    return header


def ensure_tokens(cfg: DataConfig, tok: Tokenizer, *, progress: bool = True) -> Path:
    """Tokens directory of the corpus of `cfg` in the cache, building it on first use."""
    corpus = corpus_for(cfg)
    key = f"{cfg.source}-{corpus.fingerprint}-{tok.fingerprint}"
    out = cache_root(cfg) / "tokens" / key
    if (out / INDEX).is_file():
        return out
    with _locked(out.with_name(key + ".lock")):
        if not (out / INDEX).is_file():
            try:
                prepare_corpus(corpus, tok, out, num_threads=max(1, cfg.num_workers) * 2, progress=progress)
            except DataError:
                shutil.rmtree(out, ignore_errors=True)  # bad input: leave no partial cache entry
                raise
    return out
