"""`python -m train.prepare`: tokenize a corpus into memmap token shards for `data=tokens`.

    python -m train.prepare --source shakespeare --out data/shakespeare-gpt2
    python -m train.prepare --source text --path 'corpus/*.jsonl' --text-field text --out data/corpus
    python -m train.prepare --source hf --name HuggingFaceFW/fineweb --subset sample-10BT --max-docs 100000 --out data/fw

Writes train (and val) shards plus index.json (see train/data/shards.py); the progress bar shows tokens/s
and an ETA (for a hf stream, with --max-docs). Re-running the same command resumes after the last complete
shard; a finished directory is left as it is.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
from pathlib import Path

from train.data.cache import corpus_for, prepare_corpus
from train.data.config import DataConfig
from train.data.errors import DataError
from train.data.shards import INDEX, write_tokens
from train.data.tokenizer import get_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = DataConfig()
    p = argparse.ArgumentParser(prog="python -m train.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", choices=("shakespeare", "text", "hf"), default=d.source)
    p.add_argument("--path", default=None, help="text: file, dir or glob; hf: local dataset dir / data files")
    p.add_argument("--name", default=None, help="hf: dataset name or builder (json, parquet, text)")
    p.add_argument("--subset", default=None, help="hf: dataset configuration")
    p.add_argument("--split", default=d.split, help="hf: split to tokenize as train")
    p.add_argument("--val-split", default=None, help="hf: split to tokenize as val (default: first --val-docs)")
    p.add_argument("--val-docs", type=int, default=d.val_docs, help="hf: documents held out when no --val-split")
    p.add_argument("--max-docs", type=int, default=None, help="hf: stop after this many train documents")
    p.add_argument("--text-field", default=d.text_field)
    p.add_argument("--tokenizer", default=d.tokenizer)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="shakespeare/text: held-out share")
    p.add_argument("--out", required=True, help="output directory (created; resumed when partial)")
    p.add_argument("--shard-tokens", type=int, default=50_000_000, help="tokens per shard (documents stay whole)")
    p.add_argument("--num-threads", type=int, default=4, help="tokenizer threads")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> dict:
    """Run the prepare described by `args`; returns the header written to index.json."""
    cfg = DataConfig(source=args.source, path=args.path, name=args.name, subset=args.subset, split=args.split,
                     val_split=args.val_split, val_docs=args.val_docs, text_field=args.text_field,
                     tokenizer=args.tokenizer, val_fraction=args.val_fraction, shuffle=False)
    if args.shard_tokens < 1:
        raise DataError(f"--shard-tokens must be >= 1, got {args.shard_tokens}")
    if args.max_docs is not None and args.max_docs < 1:
        raise DataError(f"--max-docs must be >= 1, got {args.max_docs}")
    tok = get_tokenizer(cfg.tokenizer)
    out = Path(args.out)
    progress = not args.no_progress
    if cfg.source != "hf":
        corpus = corpus_for(cfg)  # validates path, files, text field before any tokenizing
        return prepare_corpus(corpus, tok, out, shard_tokens=args.shard_tokens, num_threads=args.num_threads,
                              progress=progress)
    from train.data.hf import hf_documents

    def train_docs():
        docs = hf_documents(cfg, "train")
        return itertools.islice(docs, args.max_docs) if args.max_docs else docs

    hf_documents(cfg, "val")  # validate both splits up front
    source = {"kind": "hf", "name": cfg.name, "path": cfg.path, "subset": cfg.subset, "split": cfg.split,
              "val_split": cfg.val_split, "val_docs": cfg.val_docs, "max_docs": args.max_docs,
              "text_field": cfg.text_field}
    # a stream has no content hash: its identity is the request itself
    fingerprint = "hf:" + ":".join(str(v) for v in source.values())
    return write_tokens(out, {"train": train_docs, "val": lambda: hf_documents(cfg, "val")}, tok,
                        fingerprint=fingerprint, source=source, shard_tokens=args.shard_tokens,
                        num_threads=args.num_threads, progress=progress,
                        # a stream's length is known only when capped: the ETA needs --max-docs
                        expected_docs={"train": args.max_docs, "val": None if cfg.val_split else cfg.val_docs})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    fresh = not out.exists()
    try:
        header = prepare(args)
    except DataError as e:
        if fresh and out.exists() and not (out / INDEX).exists():
            shutil.rmtree(out, ignore_errors=True)  # bad input: leave nothing half-written behind
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, info in header["splits"].items():
        print(f"{split}: {info['n_tokens']:,} tokens, {info['n_docs']:,} documents, {len(info['shards'])} shard(s)")
    print(f"wrote {out / INDEX} ({header['dtype']}, tokenizer {header['tokenizer']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
