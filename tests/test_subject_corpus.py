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
    from autointerp.models import load_causal_lm

    folder = tmp_path / "tiny"
    _tiny_llama(folder)
    m1, _ = load_causal_lm(str(folder), device="cpu")
    # the hub path: a real HF cache layout, resolved offline by transformers/huggingface_hub (no network, no patching)
    snap = tmp_path / "hub" / "models--org--tiny" / "snapshots" / ("a" * 40)
    snap.parent.mkdir(parents=True)
    os.symlink(folder, snap)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    code = ("import sys, torch; from autointerp.models import load_causal_lm; m, t = load_causal_lm('org/tiny', "
            "device='cpu'); print(float(sum(p.sum() for p in m.parameters())))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.strip().splitlines()[-1]) == pytest.approx(float(sum(p.sum() for p in m1.parameters())), rel=1e-5)


def test_bad_model_spec():
    from autointerp.models import load_causal_lm

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
