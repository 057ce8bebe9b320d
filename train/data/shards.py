"""Token shards on disk: a resumable writer and a memmap reader.

Layout of a tokens directory (written by `python -m train.prepare` and by the on-the-fly cache):
    index.json             header, written last: format, version, tokenizer (+ fingerprint), n_vocab,
                           eot_token, dtype, corpus fingerprint + description, per split: n_tokens,
                           n_docs and the shard list [{"file", "n_tokens"}]
    <split>_<NNNNNN>.bin   raw tokens (uint16 when the vocabulary fits, else uint32); documents are
                           whole within a shard and each is followed by the EOT token
    <split>_<NNNNNN>.json  per-shard sidecar (documents covered), so a re-run resumes after it
Every file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from train.data.errors import DataError, DataPathNotFoundError
from train.data.tokenizer import Tokenizer

FORMAT = "lmforge-tokens"
VERSION = 1
INDEX = "index.json"
DTYPES = ("uint16", "uint32")
_GROUP_CHARS = 4 << 20  # characters tokenized per batch call
_PIECE_CHARS = 1 << 18  # long documents are tokenized in pieces of about this many characters


def token_dtype(n_vocab: int) -> str:
    return "uint16" if n_vocab <= 1 << 16 else "uint32"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def split_for_tokenizing(text: str, piece_chars: int) -> list[str]:
    """Cut a long text into pieces that tokenize exactly like the whole (tiktoken's BPE regexes).

    Cuts only between a letter and a following line break: in the GPT-2 / cl100k / o200k patterns a
    run of letters always ends a pre-token there and the whitespace run starts the next one, so
    per-piece encoding concatenates to the whole text's encoding (long documents then use all
    tokenizer threads with bounded memory).
    """
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        nl = text.find("\n", start + piece_chars)
        while nl != -1 and not text[nl - 1].isalpha():
            nl = text.find("\n", nl + 1)
        if nl == -1:
            break
        pieces.append(text[start:nl])
        start = nl
    pieces.append(text[start:])
    return pieces


def _groups(docs: Iterator[str], splittable: bool) -> Iterator[tuple[list[str], list[bool]]]:
    """Batches of texts for one tokenizer call, with a flag per text: does it end a document."""
    group, ends, size = [], [], 0
    for d in docs:
        pieces = split_for_tokenizing(d, _PIECE_CHARS) if splittable else [d]
        for k, piece in enumerate(pieces):
            group.append(piece)
            ends.append(k == len(pieces) - 1)
            size += len(piece)
            if size >= _GROUP_CHARS:
                yield group, ends
                group, ends, size = [], [], 0
    if group:
        yield group, ends


def _write_split(out: Path, split: str, docs: Iterator[str], tok: Tokenizer, dtype: str,
                 shard_tokens: int, num_threads: int, progress: bool, expected_docs: int | None = None) -> dict:
    from tqdm.auto import tqdm

    # resume: keep complete shards (sidecar present), skip the documents they cover
    shards, n_docs_done = [], 0
    while True:
        side = out / f"{split}_{len(shards):06d}.json"
        if not side.is_file():
            break
        meta = json.loads(side.read_text())
        shards.append({"file": meta["file"], "n_tokens": meta["n_tokens"]})
        n_docs_done = meta["doc_end"]
    n_tokens = sum(s["n_tokens"] for s in shards)

    # the bar counts tokens (tqdm's rate: tokens/s); with an expected document count its total is re-estimated
    # after every tokenizer group (tokens so far / share of documents done), which gives tqdm's ETA
    bar = tqdm(desc=f"tokenize {split}", unit="tok", unit_scale=True, disable=not progress or None,
               initial=n_tokens)
    buf: list[np.ndarray] = []
    buf_len, doc_i, shard_doc_start = 0, 0, n_docs_done
    eot = np.array([tok.eot_token], dtype=dtype)

    def flush() -> None:
        nonlocal buf, buf_len, shard_doc_start, n_tokens
        k = len(shards)
        name = f"{split}_{k:06d}.bin"
        _write_atomic(out / name, np.concatenate(buf).astype(dtype, copy=False).tobytes())
        meta = {"file": name, "n_tokens": buf_len, "doc_start": shard_doc_start, "doc_end": doc_i}
        _write_atomic(out / f"{split}_{k:06d}.json", json.dumps(meta).encode())
        shards.append({"file": name, "n_tokens": buf_len})
        n_tokens += buf_len
        buf, buf_len, shard_doc_start = [], 0, doc_i

    def pending() -> Iterator[str]:
        nonlocal doc_i
        for d in docs:
            if doc_i < n_docs_done:  # already in a complete shard
                doc_i += 1
                continue
            yield d

    splittable = getattr(tok, "splits_at_lines", False)
    for group, ends in _groups(pending(), splittable):
        for ids, end in zip(tok.encode_batch(group, num_threads=num_threads), ends):
            arr = np.asarray(ids, dtype=dtype)
            buf.append(arr)
            buf_len += len(arr)
            bar.update(len(arr))
            if end:  # documents stay whole within a shard, each followed by EOT
                buf.append(eot)
                buf_len += 1
                doc_i += 1
                if buf_len >= shard_tokens:
                    flush()
        if expected_docs and doc_i:  # ETA: tokens per document so far predict the split's tokens
            bar.total = max(bar.n, round(bar.n * max(expected_docs, doc_i) / doc_i))
            bar.refresh()
    if buf_len:
        flush()
    bar.close()
    return {"n_tokens": n_tokens, "n_docs": doc_i, "shards": shards}


def write_tokens(out: Path, splits: dict[str, Callable[[], Iterator[str]]], tok: Tokenizer, *,
                 fingerprint: str, source: dict, shard_tokens: int = 50_000_000, num_threads: int = 4,
                 progress: bool = True, expected_docs: dict[str, int | None] | None = None) -> dict:
    """Tokenize every split's documents into `out`; resumes after complete shards; returns the header.
    `expected_docs`: documents per split when known, for the progress bar's ETA.

    A directory already holding a different corpus / tokenizer is refused, never overwritten.
    """
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.n_vocab)
    ident = {"format": FORMAT, "version": VERSION, "tokenizer": tok.name, "tokenizer_fingerprint": tok.fingerprint,
             "n_vocab": tok.n_vocab, "eot_token": tok.eot_token, "dtype": dtype, "fingerprint": fingerprint,
             "shard_tokens": shard_tokens}
    manifest = out / "prepare.json"
    if (out / INDEX).is_file():
        header = json.loads((out / INDEX).read_text())
        if all(header.get(k) == v for k, v in ident.items()):
            return header  # already complete
        raise DataError(f"{out} already holds tokens of another corpus or tokenizer; choose an empty --out dir")
    if manifest.is_file():
        if json.loads(manifest.read_text()) != ident:
            raise DataError(f"{out} holds an unfinished prepare of another corpus, tokenizer or shard size; "
                            f"choose an empty --out dir")
    elif any(out.glob("*.bin")):
        raise DataError(f"{out} holds unrelated .bin files; choose an empty --out dir")
    else:
        _write_atomic(manifest, json.dumps(ident).encode())
    header = dict(ident, source=source, splits={})
    for split, docs in splits.items():
        header["splits"][split] = _write_split(out, split, docs(), tok, dtype, shard_tokens, num_threads, progress,
                                               (expected_docs or {}).get(split))
    _write_atomic(out / INDEX, json.dumps(header, indent=1).encode())
    return header


class TokenStore:
    """One split of a tokens directory as a single token stream (memmapped shards, opened lazily).

    Pickles without its memmaps, so DataLoader workers reopen the files themselves.
    """

    def __init__(self, root: str | os.PathLike, split: str, tok: Tokenizer | None = None) -> None:
        self.root = Path(root)
        self.split = split
        self.header = read_header(self.root, tok)
        if split not in self.header["splits"]:
            raise DataError(f"tokens dir {str(self.root)!r} has no split {split!r} "
                            f"(splits: {sorted(self.header['splits'])})")
        info = self.header["splits"][split]
        self.dtype = np.dtype(self.header["dtype"])
        self.files = [self.root / s["file"] for s in info["shards"]]
        sizes = [int(s["n_tokens"]) for s in info["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
        self.n_tokens = self.offsets[-1]
        for f, n in zip(self.files, sizes):
            if not f.is_file():
                raise DataError(f"tokens dir {str(self.root)!r}: shard {f.name} is missing")
            if f.stat().st_size != n * self.dtype.itemsize:
                raise DataError(f"tokens dir {str(self.root)!r}: shard {f.name} has {f.stat().st_size} bytes, "
                                f"header says {n} {self.dtype.name} tokens ({n * self.dtype.itemsize} bytes)")
        self._maps: list[np.memmap] | None = None

    def describe(self) -> str:
        """Where the tokens came from, for one-line errors: the corpus files, the hf dataset or the dir."""
        src = self.header.get("source") or {}
        if src.get("kind") == "shakespeare":
            return "the shakespeare corpus"
        if src.get("files"):
            from train.data.documents import name_files

            return f"the {src.get('kind', 'text')} corpus {name_files(src['files'])}"
        if src.get("kind") == "hf":
            return f"the hf dataset {src.get('name') or src.get('path')!r} (tokens dir {str(self.root)!r})"
        return f"tokens dir {str(self.root)!r}"

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _maps=None)

    def _shards(self) -> list[np.memmap]:
        if self._maps is None:
            self._maps = [np.memmap(f, dtype=self.dtype, mode="r") for f in self.files]
        return self._maps

    def read(self, start: int, length: int) -> np.ndarray:
        """tokens[start : start + length] of the split's stream as int64 (may span shards)."""
        maps, parts, end = self._shards(), [], start + length
        k = bisect.bisect_right(self.offsets, start) - 1
        while start < end:
            lo = start - self.offsets[k]
            take = min(end, self.offsets[k + 1]) - start
            parts.append(maps[k][lo:lo + take])
            start += take
            k += 1
        return np.concatenate(parts).astype(np.int64) if len(parts) > 1 else parts[0].astype(np.int64)


def read_header(root: Path, tok: Tokenizer | None = None) -> dict:
    """index.json of a tokens dir, validated; one-line DataError on anything wrong."""
    if not root.is_dir():
        raise DataPathNotFoundError(f"tokens dir {str(root)!r} does not exist; write it with python -m train.prepare")
    f = root / INDEX
    if not f.is_file():
        hint = " (an unfinished prepare: re-run it to resume)" if (root / "prepare.json").is_file() else ""
        raise DataError(f"tokens dir {str(root)!r} has no {INDEX}{hint}; write it with python -m train.prepare")
    try:
        h = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"tokens dir {str(root)!r}: {INDEX} is not valid JSON ({e})")
    if not isinstance(h, dict) or h.get("format") != FORMAT:
        raise DataError(f"tokens dir {str(root)!r}: {INDEX} is not an {FORMAT} header")
    if h.get("version") != VERSION:
        raise DataError(f"tokens dir {str(root)!r}: header version {h.get('version')!r}, supported: {VERSION}")
    if h.get("dtype") not in DTYPES:
        raise DataError(f"tokens dir {str(root)!r}: dtype {h.get('dtype')!r}, allowed: {', '.join(DTYPES)}")
    splits = h.get("splits")
    if not isinstance(splits, dict) or not all(
        isinstance(s, dict) and isinstance(s.get("shards"), list)
        and all(isinstance(x, dict) and "file" in x and "n_tokens" in x for x in s["shards"])
        for s in splits.values()
    ):
        raise DataError(f"tokens dir {str(root)!r}: {INDEX} has no valid 'splits' shard lists")
    if tok is not None and h.get("tokenizer_fingerprint") != tok.fingerprint:
        raise DataError(f"tokens dir {str(root)!r} was tokenized with {h.get('tokenizer')!r} "
                        f"(n_vocab {h.get('n_vocab')}), not with data.tokenizer={tok.name!r}")
    return h
