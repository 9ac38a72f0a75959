"""Qwen-Scope SAEs (`layer{N}.sae.pt`) and Qwen3 / Qwen3-MoE hookpoints.

Codes are checked against the model card's encode recomputed here in float64 numpy (pre = x @ W_encᵀ + b_enc, the k
largest kept, b_dec never subtracted; negatives written as 0, see qwenscope.py). Hookpoints are checked by the
identities a decoder layer obeys (resid_post = resid_mid + mlp_out, ...), computed from the modules themselves.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from autointerp.corpus import CorpusSpec, iter_windows
from autointerp.dictionaries import load_cached_dictionary, load_dictionary
from autointerp.errors import ConfigError
from autointerp.extract import extract
from autointerp.subject import SubjectModel, mlp_read_and_write, resolve_hookpoint

D_MODEL, D_SAE, K = 576, 9216, 50  # SmolLM2-135M's width; the 16x expansion and k of the L0_50 releases


def write_qwenscope(path, d_model=D_MODEL, d_sae=D_SAE, seed=0, b_enc_shift=0.0, **replace):
    """A random Qwen-Scope file in the card's layout; returns its tensors as float64 numpy (what was stored)."""
    g = torch.Generator().manual_seed(seed)
    t = {
        "W_enc": torch.randn(d_sae, d_model, generator=g) / d_model ** 0.5,
        "W_dec": torch.randn(d_model, d_sae, generator=g) / d_sae ** 0.5,
        "b_enc": torch.randn(d_sae, generator=g) * 0.1 + b_enc_shift,
        "b_dec": torch.randn(d_model, generator=g) * 0.1,
    }
    t.update(replace)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(t, path)
    return {k: v.double().numpy() for k, v in t.items() if isinstance(v, torch.Tensor)}


def card_codes(x: np.ndarray, st: dict, k: int) -> np.ndarray:
    """The card's get_feature_acts in float64: top-k of the pre-activations, raw (negatives kept)."""
    pre = x.astype(np.float64) @ st["W_enc"].T + st["b_enc"]
    idx = np.argpartition(-pre, k - 1, axis=-1)[..., :k]
    out = np.zeros_like(pre)
    np.put_along_axis(out, idx, np.take_along_axis(pre, idx, -1), -1)
    return out


def one_line_error(fn, *needles):
    with pytest.raises(ConfigError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared, busy CPU two spinning threads make these small matmuls several times slower
    (results do not depend on it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def qs_folder(tmp_path_factory):
    """A folder of two SmolLM2-sized Qwen-Scope layers, 3 and 5 (different weights)."""
    folder = tmp_path_factory.mktemp("qwenscope")
    return folder, write_qwenscope(folder / "layer3.sae.pt", seed=3), write_qwenscope(folder / "layer5.sae.pt", seed=5)


def test_smollm2_sized_file_encodes_like_the_card(subject, qs_folder):
    folder, st3, st5 = qs_folder
    d = load_dictionary(folder / "layer3.sae.pt")
    assert (d.format, d.hookpoint, d.d_in, d.n_latents, d.k) == ("qwenscope", "resid_post.3", D_MODEL, D_SAE, K)
    assert d.cfg["k_from"] == "default" and not d.subtract_b_dec
    text = "The capital of France is Paris, and the river is the Seine."
    ids = subject.tokenizer(text, return_tensors="pt").input_ids
    real = subject.capture(ids, ["resid_post.3"])["resid_post.3"][0]
    x = torch.cat([real, torch.randn(7, D_MODEL) * 3]).float()
    got = d.encode(x).numpy()
    card = card_codes(x.double().numpy(), st3, K)
    want = np.maximum(card, 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert ((got > 0).sum(-1) == (card > 0).sum(-1)).all() and (got > 0).sum(-1).max() == K
    # the decoder: rows are the stored W_dec's columns; decode adds b_dec
    np.testing.assert_allclose(d.decoder_directions().numpy(), st3["W_dec"].T, rtol=1e-6)
    np.testing.assert_allclose(d.decode(torch.from_numpy(want).float()).numpy(), want @ st3["W_dec"].T + st3["b_dec"],
                               rtol=1e-4, atol=1e-4)
    # a hookpoint given replaces the file name's
    other = load_dictionary(folder / "layer3.sae.pt", format="qwenscope", hookpoint="resid_pre.4")
    assert other.hookpoint == "resid_pre.4"

    # the folder: hookpoint=layer<N> or <alias>.<N> picks the file, and is not taken as a hookpoint override
    for sel, st, hp in (("layer3", st3, "resid_post.3"), ("resid_post.5", st5, "resid_post.5")):
        m = load_dictionary(folder, hookpoint=sel)
        assert m.hookpoint == hp and m.id.endswith(f"layer{hp[-1]}.sae.pt")
        np.testing.assert_allclose(m.encode(x).numpy(), np.maximum(card_codes(x.double().numpy(), st, K), 0),
                                   rtol=1e-5, atol=1e-5 * np.abs(want).max())
    one_line_error(lambda: load_dictionary(folder), "holds 2 Qwen-Scope layer files", "hookpoint=layer<N>")
    one_line_error(lambda: load_dictionary(folder, hookpoint="layer7"), "layer7", "layer3.sae.pt, layer5.sae.pt")


def test_relu_after_topk_and_where_k_comes_from(tmp_path):
    # b_enc far below zero: most tokens have fewer than k positive pre-activations, the card's negatives become 0
    st = write_qwenscope(tmp_path / "a" / "layer0.sae.pt", d_model=16, d_sae=256, b_enc_shift=-2.0)
    x = torch.randn(40, 16) * 2
    card = card_codes(x.double().numpy(), st, K)
    assert (card < 0).any()
    got = load_dictionary(tmp_path / "a" / "layer0.sae.pt").encode(x).numpy()
    np.testing.assert_allclose(got, np.maximum(card, 0), rtol=1e-5, atol=1e-6)

    # k: the repo name's L0_<k> (as a hub cache path keeps it), then a cfg.json beside the files (the override)
    hub = tmp_path / "models--Qwen--SAE-Res-Qwen3-1.7B-Base-W32K-L0_100" / "snapshots" / "abc123"
    write_qwenscope(hub / "layer2.sae.pt", d_model=16, d_sae=256)
    d = load_dictionary(hub / "layer2.sae.pt")
    assert d.k == 100 and d.hookpoint == "resid_post.2"
    assert ((d.encode(x) > 0).sum(-1) <= 100).all() and (d.encode(x) > 0).sum(-1).max() == 100
    (hub / "cfg.json").write_text(json.dumps({"k": 7}))
    got = load_dictionary(hub / "layer2.sae.pt").encode(x).numpy()
    assert (got > 0).sum(-1).max() == 7
    (hub / "cfg.json").write_text(json.dumps({"k": "many"}))
    one_line_error(lambda: load_dictionary(hub / "layer2.sae.pt"), str(hub / "cfg.json"), "'k'")
    (hub / "cfg.json").write_text(json.dumps({"k": 300}))
    one_line_error(lambda: load_dictionary(hub / "layer2.sae.pt"), "k=300", "d_sae=256")


class Custom:  # an object weights_only refuses to unpickle
    pass


def test_bad_files_fail_in_one_line(tmp_path):
    def bad(name, obj):
        p = tmp_path / name / "layer1.sae.pt"
        p.parent.mkdir()
        torch.save(obj, p)
        return p

    ok = {"W_enc": torch.randn(32, 8), "W_dec": torch.randn(8, 32), "b_enc": torch.zeros(32), "b_dec": torch.zeros(8)}
    p = bad("transposed_enc", {**ok, "W_enc": torch.randn(8, 32)})
    one_line_error(lambda: load_dictionary(p), str(p), "W_enc", "(8, 32)", "expected (32, 8)")
    p = bad("transposed_dec", {**ok, "W_dec": torch.randn(32, 8)})
    one_line_error(lambda: load_dictionary(p), "W_dec", "(32, 8)", "expected (8, 32)")
    p = bad("object", {**ok, "extra": Custom()})
    one_line_error(lambda: load_dictionary(p), str(p), "weights_only", "Custom")
    p = bad("tensor", torch.randn(3, 3))
    one_line_error(lambda: load_dictionary(p), str(p), "holds a Tensor")
    p = bad("missing", {k: v for k, v in ok.items() if k != "b_enc"})
    one_line_error(lambda: load_dictionary(p), str(p), "'b_enc'")
    p = bad("not_tensor", {**ok, "b_dec": [0.0] * 8})
    one_line_error(lambda: load_dictionary(p), "'b_dec' is a list")
    p = tmp_path / "junk" / "layer1.sae.pt"
    p.parent.mkdir()
    p.write_bytes(b"not a checkpoint" * 10)
    one_line_error(lambda: load_dictionary(p), str(p))
    one_line_error(lambda: load_dictionary(p, format="sparsify"), "qwenscope checkpoint")


def test_extract_smollm2(subject, qs_folder, tmp_path):
    folder, st3, _ = qs_folder
    n_tokens, batch = 3072, 16
    (cache,) = extract(subject, str(folder / "layer3.sae.pt"), None, "builtin", tmp_path / "c", n_tokens=n_tokens,
                       ctx_len=32, batch_size=batch, top_k=5, n_sample=5, pool_size=16, progress=False)
    m = cache.manifest
    assert m["hookpoint"] == "resid_post.3" and m["dictionary"]["format"] == "qwenscope"
    assert m["dictionary"]["n_latents"] == D_SAE and cache.n_tokens == n_tokens

    # brute force: the card's codes over the same windows, with the positions extraction ignores zeroed
    spec = CorpusSpec(source="builtin", ctx_len=32, n_tokens=n_tokens, seed=0)
    special = torch.tensor(subject.tokenizer.all_special_ids)
    n_active, wmax = np.zeros(D_SAE, np.int64), []
    for win in iter_windows(spec, subject.tokenizer, batch):
        ids = torch.from_numpy(win).long()
        x = subject.capture(ids, ["resid_post.3"])["resid_post.3"].float()
        norms = x.norm(dim=-1)
        keep = ~(torch.isin(ids, special) | (norms > 5 * norms.median()))
        codes = np.maximum(card_codes(x.double().numpy(), st3, K), 0) * keep.numpy()[..., None]
        n_active += (codes > 0).sum((0, 1))
        wmax.append(codes.max(1))
    wmax = np.concatenate(wmax)
    got = cache.stats["n_active"]
    # float32 vs float64 may swap the k-th and (k+1)-th latent of a rare token: a handful of the ~150k firings
    assert np.abs(got - n_active).sum() <= 20 and got.sum() == pytest.approx(n_active.sum(), abs=10)
    assert 0.5 * K * n_tokens < got.sum() <= K * n_tokens  # every kept token fires k latents
    freq = cache.summary([0])[0]
    assert freq["frequency"] == pytest.approx(n_active[0] / n_tokens, abs=3 / n_tokens)
    assert (freq["max_act"] > 0) == (n_active[0] > 0) and freq["mean_act"] <= freq["max_act"]
    for lat in (0, int(np.argmax(n_active)), int(np.argmax(wmax.max(0)))):
        rec = cache.record(lat)
        assert rec.stats.max_act == pytest.approx(wmax[:, lat].max(), rel=1e-4)
        want = np.sort(wmax[:, lat][wmax[:, lat] > 0])[::-1][:5]
        np.testing.assert_allclose(rec.top.acts.max(1), want, rtol=1e-4)
    # the manifest's id reloads the same checkpoint
    again = load_cached_dictionary(m["dictionary"])
    assert again.n_latents == D_SAE and again.k == K


@pytest.mark.parametrize("hookpoint", ["resid_post.5", "layer5"])
def test_extract_picks_the_layer_file_of_a_folder(subject, qs_folder, tmp_path, hookpoint):
    """`extract -d FOLDER --hookpoint resid_post.5` (or layer5) on a folder of layer files extracts layer 5's file
    at resid_post.5 (the folder alone names no single dictionary)."""
    folder, _, _ = qs_folder
    (cache,) = extract(subject, str(folder), hookpoint, "builtin", tmp_path / "c", n_tokens=256, ctx_len=32,
                       batch_size=8, top_k=2, n_sample=2, pool_size=4, progress=False)
    assert cache.manifest["hookpoint"] == "resid_post.5"
    assert cache.manifest["dictionary"]["id"].endswith("layer5.sae.pt")


def test_hub_repo_with_layer_selector(subject, tmp_path, monkeypatch):
    """A Qwen-Scope hub repo (files at its root, no folders), from an offline Hugging Face cache: hookpoint=layer<N>
    or resid_post.<N> names layer<N>.sae.pt; k comes from the repo name's L0_<k>."""
    import huggingface_hub.constants as hf

    repo, commit = "models--Qwen--SAE-Res-SmolLM2-W1K-L0_20", "0" * 40
    snap = tmp_path / "hub" / repo / "snapshots" / commit
    st = write_qwenscope(snap / "layer1.sae.pt", d_sae=1024, seed=1)
    (tmp_path / "hub" / repo / "refs").mkdir()
    (tmp_path / "hub" / repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_id = "Qwen/SAE-Res-SmolLM2-W1K-L0_20"
    d = load_dictionary(hub_id, hookpoint="layer1")
    assert (d.id, d.hookpoint, d.k) == (f"qwenscope:{hub_id}:layer1.sae.pt", "resid_post.1", 20)
    one_line_error(lambda: load_dictionary(hub_id, hookpoint="layer2"), "layer2", "layer2.sae.pt")
    (cache,) = extract(subject, hub_id, "resid_post.1", "builtin", tmp_path / "c", n_tokens=1024, ctx_len=32,
                       batch_size=16, top_k=3, n_sample=3, pool_size=8, progress=False)
    assert cache.manifest["hookpoint"] == "resid_post.1" and cache.manifest["dictionary"]["id"] == d.id
    lat = int(np.argmax(cache.stats["n_active"]))
    win = torch.from_numpy(cache.record(lat).top.tokens[:1]).long()
    x = subject.capture(win, ["resid_post.1"])["resid_post.1"].double().numpy()
    codes = np.maximum(card_codes(x, st, 20), 0)[0, :, lat]
    codes[np.isin(win[0].numpy(), subject.tokenizer.all_special_ids)] = 0
    assert cache.record(lat).top.acts[0].max() == pytest.approx(codes.max(), rel=1e-4)


# ---- tiny random Qwen3 / Qwen3-MoE (and Mixtral, whose MoE block is `block_sparse_moe`) subjects ----

def tiny_subject(kind: str, tokenizer) -> SubjectModel:
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, intermediate_size=96,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if kind == "qwen3":
        cfg = tf.Qwen3Config(head_dim=16, **common)
    elif kind == "qwen3_moe":  # layer 0 a dense MLP, layer 1 a mixture of experts (as mlp_only_layers allows)
        cfg = tf.Qwen3MoeConfig(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                mlp_only_layers=[0], **common)
    else:
        cfg = tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)
    return SubjectModel(model, tokenizer, f"tiny-{kind}")


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe", "mixtral"])
def test_aliases_on_qwen3_and_moe(subject, kind):
    s = tiny_subject(kind, subject.tokenizer)
    ids = torch.randint(0, len(subject.tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    names = ["resid_post.0", "mlp_in.0", "mlp_out.0", *(f"{a}.1" for a in
             ("resid_pre", "resid_mid", "resid_post", "attn_out", "attn_z", "mlp_in", "mlp_out"))]
    moe = kind != "qwen3"
    if kind != "mixtral":
        names.append("mlp_neurons.0")  # dense in Qwen3 and in the MoE model's mlp_only_layers
    c = s.capture(ids, names)
    L = s.model.model.layers
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # noqa: E731
    close(c["resid_pre.1"], c["resid_post.0"])
    close(c["resid_mid.1"], c["resid_pre.1"] + c["attn_out.1"])
    close(c["resid_post.1"], c["resid_mid.1"] + c["mlp_out.1"])
    close(c["mlp_in.1"], L[1].post_attention_layernorm(c["resid_mid.1"]))
    close(c["attn_out.1"], L[1].self_attn.o_proj(c["attn_z.1"]))
    assert c["attn_z.1"].shape[-1] == 4 * 16
    block = L[1].block_sparse_moe if kind == "mixtral" else L[1].mlp
    out = block(c["mlp_in.1"])
    close(c["mlp_out.1"], out[0] if isinstance(out, tuple) else out)
    if kind != "mixtral":
        mlp0 = L[0].mlp
        close(c["mlp_neurons.0"], mlp0.act_fn(mlp0.gate_proj(c["mlp_in.0"])) * mlp0.up_proj(c["mlp_in.0"]))
        close(c["mlp_out.0"], mlp0.down_proj(c["mlp_neurons.0"]))
    mlp_name = "block_sparse_moe" if kind == "mixtral" else "mlp"
    assert s.hookpoint("mlp_out.1").module_path == f"model.layers.1.{mlp_name}"
    # a transcoder at an MoE block reads the whole block's input and writes its output
    assert mlp_read_and_write(s.model, s.hookpoint("mlp_out.1")) == (f"model.layers.1.{mlp_name}:input",
                                                                      f"model.layers.1.{mlp_name}:output")
    if moe:
        one_line_error(lambda: resolve_hookpoint(s.model, "mlp_neurons.1"), "mixture of experts", "mlp_out.1")
    else:
        assert s.width("mlp_neurons.1") == 96


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe"])
def test_extract_on_tiny_qwen3(subject, kind, tmp_path):
    from dict_fixtures import write_sparsify

    s = tiny_subject(kind, subject.tokenizer)
    sae = tmp_path / "sae" / "mlp_out.1"
    write_sparsify(sae, d_in=64, n=128, k=8)
    tc = tmp_path / "tc" / "mlp_out.1"
    write_sparsify(tc, d_in=64, n=128, k=8, transcode=True)
    targets = [("topk-neurons:8", "resid_post.1"), ("topk-neurons:8", "attn_out.1"), ("neurons", "attn_z.1"),
               ("topk-neurons:8", "mlp_out.1"), ("topk-neurons:8", "mlp_neurons.0"), (str(sae), "mlp_out.1"),
               (str(tc), "mlp_out.1")]
    caches = extract(s, [d for d, _ in targets], [h for _, h in targets], "builtin", tmp_path / "c", n_tokens=2048,
                     ctx_len=32, batch_size=16, top_k=5, n_sample=5, pool_size=16, progress=False)
    got = {c.manifest["dictionary"]["id"].split(":")[0] + "@" + c.manifest["hookpoint"]: c for c in caches}
    mlp = "model.layers.1.mlp"
    assert sorted(got) == sorted(["topk-neurons@resid_post.1", "topk-neurons@attn_out.1", "neurons@attn_z.1",
                                  "topk-neurons@mlp_out.1", "topk-neurons@mlp_neurons.0", "sparsify@mlp_out.1",
                                  f"sparsify@{mlp}:input"])  # the transcoder reads the (MoE) block's input
    for key, c in got.items():
        n = c.stats["n_active"].sum()
        assert c.n_tokens == 2048 and n > 0, key
        if key.startswith("topk-neurons"):
            assert n <= 8 * 2048, key
    assert got["neurons@attn_z.1"].n_latents == 2 * 64  # signed: both poles of each of the 64 head dims

    # the top window of the busiest resid_post neuron, recomputed from a plain capture: top-8 by value, its max
    c = got["topk-neurons@resid_post.1"]
    lat = int(np.argmax(c.stats["n_active"]))
    rec = c.record(lat)
    x = s.capture(torch.from_numpy(rec.top.tokens).long(), ["resid_post.1"])["resid_post.1"]
    top8 = torch.zeros_like(x).scatter_(-1, x.topk(8, dim=-1).indices, x.topk(8, dim=-1).values).clamp(min=0)
    special = torch.isin(torch.from_numpy(rec.top.tokens).long(), torch.tensor(subject.tokenizer.all_special_ids))
    want = top8[..., lat].masked_fill(special, 0).amax(-1).numpy()
    np.testing.assert_allclose(rec.top.acts.max(1), want, rtol=1e-4)
