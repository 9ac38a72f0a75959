"""What a dictionary is worth (autointerp.quality): `reconstruct` of every checkpoint format against numpy; FVU, L0 and
the spliced-in losses against by-hand computations on the real SmolLM2 with dictionaries trained here; the quality
block through extraction, shards, the store, the CLI and the API."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dict_fixtures import make_inputs, write_gemmascope, write_saelens, write_sparsify
from test_dictionaries import ref_gemmascope, ref_saelens, ref_sparsify

from autointerp.corpus import CorpusSpec, iter_windows
from autointerp.dictionaries import LinearDictionary, as_units, load_dictionary
from autointerp.quality import l0_histogram, latent_usage, splice_quality

HOOK = "resid_post.3"  # the SAE's (an output hook); shallow, so extraction is quick
TC = "layers.1.mlp"  # the transcoder's: reads the MLP's input, spliced in at its output


# ------------------------------------------------------------------ reconstruct: every format against numpy


def _decode(codes, w, rescale=False):
    if rescale:  # SAELens topk with rescale_acts_by_decoder_norm divides the codes back before decoding
        codes = codes / np.linalg.norm(w["W_dec"], axis=-1)
    return codes @ w["W_dec"] + w["b_dec"]


def _sparsify_abstopk(x, w, k):
    pre = (x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"]
    idx = np.argsort(-np.abs(pre), axis=-1)[..., :k]
    out = np.zeros_like(pre)
    np.put_along_axis(out, idx, np.take_along_axis(pre, idx, -1), -1)
    return out


def _case(name, tmp):
    """(dictionary, reference reconstruction of x as a function of x float64 [..., d_in])."""
    if name == "sparsify-topk":
        w = write_sparsify(tmp / "s", k=4)
        return load_dictionary(tmp / "s"), lambda x: _decode(ref_sparsify(x, w, 4), w)
    if name == "sparsify-transcoder-skip":  # sparsify: W_skip [d_out, d_in], out += x @ W_skipᵀ
        w = write_sparsify(tmp / "t", k=4, transcode=True, d_out=6, skip=True)
        return load_dictionary(tmp / "t"), lambda x: _decode(ref_sparsify(x, w, 4, transcode=True), w) + x @ w["W_skip"].T
    if name == "sparsify-abstopk-poles":  # a signed dictionary, as the extraction collects it
        w = write_sparsify(tmp / "a", k=4, activation="abstopk")
        return as_units(load_dictionary(tmp / "a")), lambda x: _decode(_sparsify_abstopk(x, w, 4), w)
    if name == "saelens-standard-constant-norm":  # SAELens undoes it on the way out: / (sqrt(d) / ‖x‖)
        w = write_saelens(tmp / "c", normalize_activations="constant_norm_rescale")
        return load_dictionary(tmp / "c"), lambda x: _decode(
            ref_saelens(x, w, "standard", norm="constant_norm_rescale"), w) * np.linalg.norm(x, axis=-1, keepdims=True) / np.sqrt(8)
    if name == "saelens-standard-expected-average":  # the dataset factor: in × s, out / s
        w = write_saelens(tmp / "e", normalize_activations="expected_average_only_in")
        return load_dictionary(tmp / "e", norm_scaling_factor=0.25), lambda x: _decode(
            ref_saelens(x, w, "standard", scale=0.25), w) / 0.25
    if name == "saelens-topk-layer-norm-rescaled":  # out × std + mean (SAELens' ln out: no eps)
        w = write_saelens(tmp / "k", arch="topk", k=3, normalize_activations="layer_norm",
                          rescale_acts_by_decoder_norm=True)
        return load_dictionary(tmp / "k"), lambda x: _decode(
            ref_saelens(x, w, "topk", k=3, rescale=True, norm="layer_norm"), w, rescale=True) \
            * x.std(-1, ddof=1, keepdims=True) + x.mean(-1, keepdims=True)
    if name in ("saelens-jumprelu", "saelens-gated"):
        arch = name.split("-")[1]
        w = write_saelens(tmp / arch, arch=arch)
        return load_dictionary(tmp / arch), lambda x: _decode(ref_saelens(x, w, arch), w)
    if name == "saelens-skip-transcoder":  # SAELens SkipTranscoder: W_skip [d_out, d_in], out += x @ W_skipᵀ
        w = write_saelens(tmp / "st", arch="skip_transcoder", d_out=6, apply_b_dec_to_input=False,
                          hook_name="blocks.1.ln2.hook_normalized", hook_name_out="blocks.1.hook_mlp_out")
        return load_dictionary(tmp / "st"), lambda x: _decode(ref_saelens(x, w, "skip_transcoder"), w) + x @ w["W_skip"].T
    if name == "saelens-transcoder-constant-norm":  # a transcoder's output is never un-normalised (SAELens decode)
        w = write_saelens(tmp / "tn", arch="transcoder", d_out=6, normalize_activations="constant_norm_rescale",
                          hook_name="blocks.1.ln2.hook_normalized", hook_name_out="blocks.1.hook_mlp_out")
        return load_dictionary(tmp / "tn"), lambda x: _decode(
            ref_saelens(x, w, "transcoder", norm="constant_norm_rescale"), w)
    if name == "gemmascope":
        w = write_gemmascope(tmp / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_9" / "params.npz")
        return load_dictionary(tmp / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_9"), \
            lambda x: _decode(ref_gemmascope(x, w), w)
    if name == "neurons":
        return as_units(load_dictionary("neurons", d_in=8)), lambda x: x
    assert name == "topk-neurons"
    return load_dictionary("topk-neurons:3", d_in=8), lambda x: np.where(x >= np.sort(x, -1)[..., -3:-2], x, 0.0)


CASES = ["sparsify-topk", "sparsify-transcoder-skip", "sparsify-abstopk-poles", "saelens-standard-constant-norm",
         "saelens-standard-expected-average", "saelens-topk-layer-norm-rescaled", "saelens-jumprelu", "saelens-gated",
         "saelens-skip-transcoder", "saelens-transcoder-constant-norm", "gemmascope", "neurons", "topk-neurons"]


@pytest.mark.parametrize("name", CASES)
def test_reconstruct_matches_numpy(tmp_path, name):
    d, ref = _case(name, tmp_path)
    x = make_inputs(8) * (0.01 if "layer-norm" in name else 1)  # a small std: SAELens' undo has no eps, visibly
    got = d.reconstruct(x)
    want = ref(x.double().numpy())
    assert got.dtype == torch.float32 and got.shape == (3, 5, d.d_out)
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=2e-5)
    assert not np.allclose(want, x.numpy()[..., :d.d_out]) or name == "neurons"  # a real reconstruction, not x
    plain = getattr(d, "input_norm", "none") == "none" and getattr(d, "input_scale", None) is None
    if plain and "skip" not in name:  # no input normalisation to undo, no skip: reconstruct is decode ∘ encode
        np.testing.assert_allclose(d.decode(d.encode(x)).float().numpy(), want, rtol=1e-4, atol=1e-4)


def test_loaders_refuse_a_skip_transcoder_without_w_skip(tmp_path):
    from safetensors.torch import load_file, save_file

    from autointerp.errors import ConfigError

    write_saelens(tmp_path / "st", arch="skip_transcoder", d_out=6, apply_b_dec_to_input=False)
    t = load_file(str(tmp_path / "st" / "sae_weights.safetensors"))
    save_file({k: v for k, v in t.items() if k != "W_skip"}, str(tmp_path / "st" / "sae_weights.safetensors"))
    with pytest.raises(ConfigError, match="W_skip"):
        load_dictionary(tmp_path / "st")


# ------------------------------------------------------------------ pieces computed by hand


def test_l0_histogram_and_latent_usage_by_hand():
    h = l0_histogram(np.array([3, 3, 4, 10, 3, 70]), bins=4)  # width ceil(68 / 4) = 17: [3,20) [20,37) ... [54,71)
    assert h == {"edges": [3, 20, 37, 54, 71], "counts": [5, 0, 0, 1]}
    assert l0_histogram(np.array([32] * 5)) == {"edges": [32, 33], "counts": [5]}
    u = latent_usage(torch.tensor([0, 0, 5, 11, 100, 1]), 100)  # frequencies 0, 0, .05, .11, 1, .01
    assert u == {"n_units": 6, "dead_fraction": 2 / 6, "dense_fraction": 2 / 6, "dense_threshold": 0.1}


def _windows(subject, n: int, ctx: int, seed: int) -> np.ndarray:
    spec = CorpusSpec(n_tokens=n * ctx, ctx_len=ctx, seed=seed)
    return np.concatenate(list(iter_windows(spec, subject.tokenizer, n)))[:n]


def test_fvu_and_l0_equal_a_by_hand_computation(subject):
    """A synthetic ReLU dictionary at the MLP neurons (an input hook: spliced by a forward pre-hook)."""
    hp, n, d = "mlp_neurons.1", 48, subject.width("mlp_neurons.1")
    g = torch.Generator().manual_seed(3)
    W_enc, W_dec = torch.randn(n, d, generator=g) / d**0.5, torch.randn(n, d, generator=g) * 0.05
    b_enc, b_dec = torch.randn(n, generator=g) * 0.1 - 0.05, torch.randn(d, generator=g) * 0.01
    sae = LinearDictionary(format="test", source="synthetic", id="synthetic", hookpoint=hp, transcoder=False,
                           W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, activation="relu")
    windows = _windows(subject, 4, 32, seed=5)
    q = splice_quality(subject, sae, hp, windows, max_norm_ratio=0)

    ids = torch.from_numpy(windows).long()
    x = subject.capture(ids, [hp])[hp].double().numpy()
    keep = ~subject.special_token_mask(ids).numpy()
    xk = x[keep]
    codes = np.maximum(xk @ W_enc.double().numpy().T + b_enc.double().numpy(), 0)
    xhat = codes @ W_dec.double().numpy() + b_dec.double().numpy()
    fvu = ((xk - xhat) ** 2).sum() / ((xk - xk.mean(0)) ** 2).sum()
    l0 = (codes > 0).sum(-1)
    assert q["n_tokens"] == keep.sum() <= 4 * 31  # at least one BOS per window left out
    assert q["fvu"] == pytest.approx(fvu, rel=1e-5) and 0.05 < fvu < 5
    assert q["l0"] == pytest.approx(l0.mean(), abs=1e-9) and 0 < l0.mean() < n
    assert q["l0_hist"] == l0_histogram(l0) and sum(q["l0_hist"]["counts"]) == keep.sum()
    assert abs(q["loss_with_error"] - q["loss_clean"]) < 1e-4
    assert q["spliced_at"] == hp


# ------------------------------------------------------------------ dictionaries trained here


@pytest.fixture(scope="module")
def trained(subject, tmp_path_factory):
    """A TopK SAE at resid_post.3 and a TopK transcoder of layer 1's MLP, trained on SmolLM2 (seconds each), on
    windows of another corpus seed than the ones evaluated."""
    from autointerp.train_sae import train_topk_sae

    root = tmp_path_factory.mktemp("quality_dicts")
    resid, ins, outs = [], [], []
    for batch in iter_windows(CorpusSpec(n_tokens=8192, ctx_len=64, seed=7), subject.tokenizer, 32):
        ids = torch.from_numpy(batch).long()
        got = subject.capture(ids, [HOOK, "mlp_in.1", "mlp_out.1"])  # one forward pass to layer 3
        keep = ~subject.special_token_mask(ids)
        resid.append(got[HOOK][keep & ~subject.outlier_mask(got[HOOK], 5.0)])  # as collect_activations
        ins.append(got["mlp_in.1"][keep])
        outs.append(got["mlp_out.1"][keep])
    sae = train_topk_sae(torch.cat(resid), 256, 16, out_dir=root / "sae", hookpoint=HOOK, steps=300, num_threads=1)
    tc = train_topk_sae(torch.cat(ins), 256, 16, targets=torch.cat(outs), transcode=True, out_dir=root / "tc",
                        hookpoint=TC, steps=300, num_threads=1)
    return {"sae": sae.path, "tc": tc.path}


def _hand_losses(subject, windows, module, xhat_of, read_module=None):
    """Clean, spliced and zero-ablated next-token losses and KL(clean || spliced), with hooks written here: the
    output of `module` replaced (at non-special, non-outlier positions) by xhat_of(what the dictionary reads)."""
    model = subject.model
    ids = torch.from_numpy(windows).long()
    special = subject.special_token_mask(ids)
    read = {}
    grab = (read_module or module).register_forward_pre_hook(lambda m, a: read.update(x=a[0])) if read_module \
        else module.register_forward_hook(lambda m, a, o: read.update(x=o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        clean = model(input_ids=ids, use_cache=False).logits
    grab.remove()
    keep = ~(special | subject.outlier_mask(read["x"], 5.0))
    xhat = xhat_of(read["x"])

    def run(new):
        def hook(m, a, o):
            if isinstance(o, tuple):
                return (torch.where(keep[..., None], new(o[0]), o[0]), *o[1:])
            return torch.where(keep[..., None], new(o), o)
        h = module.register_forward_hook(hook)
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=False).logits
        h.remove()
        return out

    spliced, zero = run(lambda o: xhat), run(torch.zeros_like)
    lm = ~special[:, :-1] & ~special[:, 1:]

    def ce(logits):
        return F.cross_entropy(logits[:, :-1][lm].double(), ids[:, 1:][lm]).item()

    p, q = clean[:, :-1][lm].double().log_softmax(-1), spliced[:, :-1][lm].double().log_softmax(-1)
    return {"loss_clean": ce(clean), "loss_spliced": ce(spliced), "loss_zero_ablated": ce(zero),
            "kl_spliced": (p.exp() * (p - q)).sum(-1).mean().item(), "n_predictions": int(lm.sum())}


def _numpy_topk_sae(folder):
    from safetensors.numpy import load_file

    w, cfg = load_file(str(folder / "sae.safetensors")), json.loads((folder / "cfg.json").read_text())

    def xhat(x: torch.Tensor) -> torch.Tensor:
        a = x.double().numpy()
        pre = np.maximum((a if cfg["transcode"] else a - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"], 0)
        idx = np.argsort(-pre, axis=-1)[..., :cfg["k"]]
        codes = np.zeros_like(pre)
        np.put_along_axis(codes, idx, np.take_along_axis(pre, idx, -1), -1)
        return torch.from_numpy(codes @ w["W_dec"] + w["b_dec"]).float()
    return xhat


@pytest.mark.parametrize("which", ["sae", "tc"])
def test_spliced_losses_and_loss_recovered_of_dictionaries_trained_here(subject, trained, which):
    """The SAE at resid_post.3 (replacing the residual stream) and the transcoder (replacing layer 1's MLP output
    by its prediction from the MLP's input): losses equal hand-written splices; the spliced loss lies between the
    clean and the zero-ablated model; x̂ + (x − x̂) gives the clean loss back."""
    folder = trained[which]
    d = load_dictionary(folder)
    hp = HOOK if which == "sae" else "model.layers.1.mlp:input"  # what extraction resolves a transcoder's to
    windows = _windows(subject, 4, 32, seed=11)  # one forward's worth: the outlier rule sees the same batch
    q = splice_quality(subject, d, hp, windows)
    layer = subject.model.model.layers[3 if which == "sae" else 1]
    hand = _hand_losses(subject, windows, layer if which == "sae" else layer.mlp, _numpy_topk_sae(folder),
                        read_module=None if which == "sae" else layer.mlp)
    for key in ("loss_clean", "loss_spliced", "loss_zero_ablated", "kl_spliced"):
        assert q[key] == pytest.approx(hand[key], rel=2e-4, abs=1e-5), key
    assert q["n_predictions"] == hand["n_predictions"] > 100
    assert abs(q["loss_with_error"] - q["loss_clean"]) < 1e-4
    assert q["loss_clean"] < q["loss_spliced"] < q["loss_zero_ablated"] and q["kl_spliced"] > 0
    lr = (hand["loss_zero_ablated"] - hand["loss_spliced"]) / (hand["loss_zero_ablated"] - hand["loss_clean"])
    assert 0 < q["loss_recovered"] < 1 and q["loss_recovered"] == pytest.approx(lr, rel=1e-3)
    assert 0 < q["fvu"] < 0.8 and q["l0"] == 16.0 and q["l0_hist"] == {"edges": [16, 17], "counts": [q["n_tokens"]]}
    assert q["spliced_at"] == (HOOK if which == "sae" else "model.layers.1.mlp:output")


# ------------------------------------------------------------------ through extraction, shards, store, CLI, API

SMALL = dict(n_tokens=2048, ctx_len=32, batch_size=16, top_k=6, n_sample=6, pool_size=16, progress=False)


@pytest.fixture(scope="module")
def caches(subject, trained, tmp_path_factory):
    from autointerp.extract import extract

    root = tmp_path_factory.mktemp("quality_caches")
    (with_q,) = extract(subject, str(trained["sae"]), None, "builtin", root / "q", quality_tokens=128, **SMALL)
    (without,) = extract(subject, str(trained["sae"]), None, "builtin", root / "noq", quality=False, **SMALL)
    (tc,) = extract(subject, str(trained["tc"]), None, "builtin", root / "tc", quality_tokens=128, **SMALL)
    return {"q": with_q, "noq": without, "tc": tc, "root": root}


def test_extraction_manifest_carries_quality_and_no_quality_leaves_it_out(subject, caches):
    from autointerp.cache import ARRAYS
    from autointerp.extract import _same_run

    q, noq = caches["q"].manifest, caches["noq"].manifest
    assert "quality" not in noq
    block = q["quality"]
    assert block["n_windows"] == 4 and block["n_tokens"] > 100 and block["spliced_at"] == HOOK
    assert 0 < block["fvu"] < 0.8 and 0 < block["loss_recovered"] < 1 and block["l0"] == 16.0
    assert abs(block["loss_with_error"] - block["loss_clean"]) < 1e-4 and block["seconds"] > 0
    # dead / dense from the extraction's statistics
    freq = caches["q"].stats["n_active"] / caches["q"].n_tokens
    assert block["dead_fraction"] == pytest.approx((freq == 0).mean()) and block["n_units"] == 256
    assert block["dense_fraction"] == pytest.approx((freq > 0.1).mean()) and block["dense_fraction"] > 0
    # the same pass as splice_quality over the run's first 4 windows (128 tokens)
    windows = np.concatenate(list(iter_windows(CorpusSpec(n_tokens=2048, ctx_len=32), subject.tokenizer, 16)))[:4]
    again = splice_quality(subject, load_dictionary(caches["q"].manifest["dictionary"]["source"]), HOOK, windows)
    assert again["fvu"] == pytest.approx(block["fvu"], rel=1e-6)
    assert again["loss_spliced"] == pytest.approx(block["loss_spliced"], rel=1e-6)
    # the quality pass is no part of the identity, and leaves everything else as it was
    assert _same_run(q, noq)
    assert {k: v for k, v in q.items() if k not in ("quality", "created")} == \
        {k: v for k, v in noq.items() if k != "created"}
    for name in ARRAYS:
        np.testing.assert_array_equal(np.asarray(caches["q"].array(name)), np.asarray(caches["noq"].array(name)))
    t = caches["tc"].manifest
    assert t["hookpoint"] == "model.layers.1.mlp:input"
    # (its loss recovered is left alone: over 4 windows, noise against a gap of ~0.1 nats can put it past 1)
    assert t["quality"]["spliced_at"] == "model.layers.1.mlp:output" and t["quality"]["kl_spliced"] > 0
    assert abs(t["quality"]["loss_with_error"] - t["quality"]["loss_clean"]) < 1e-4


def test_a_complete_cache_is_not_redone_for_its_quality(subject, trained, caches):
    """--quality is no identity: asking again with the other setting finds the cache done and leaves it."""
    from autointerp.extract import extract

    before = (caches["root"] / "noq" / "manifest.json").read_text()
    (again,) = extract(subject, str(trained["sae"]), None, "builtin", caches["root"] / "noq", **SMALL)
    assert (caches["root"] / "noq" / "manifest.json").read_text() == before and "quality" not in again.manifest


def test_sharded_extraction_computes_quality_on_shard_zero_and_merges_dead_dense(subject, trained, caches, tmp_path):
    from autointerp.extract import extract_shard, publish_shards
    from autointerp.shards import load_shard_state

    kw = dict(SMALL)
    kw.pop("progress")
    states = [extract_shard(subject, str(trained["sae"]), None, "builtin", windows=w, quality_tokens=128, **kw)
              for w in ((32, 64), (0, 32))]
    assert "quality" not in load_shard_state(states[0])["meta"] and "quality" in load_shard_state(states[1])["meta"]
    merged = publish_shards(states, tmp_path / "merged").manifest["quality"]
    one = caches["q"].manifest["quality"]
    assert merged.keys() == one.keys()
    for k, v in one.items():
        if k in ("seconds",):
            continue
        assert merged[k] == (pytest.approx(v, rel=1e-6) if isinstance(v, float) else v), k


def test_store_api_page_inspect_and_compare_show_quality(subject, caches, monkeypatch):
    from typer.testing import CliRunner

    from api_support import ApiServer, http
    from autointerp.api import Settings
    from autointerp.cli import app
    from autointerp.store import open_store

    store = open_store()
    row = store.register_cache(caches["q"])
    tc = store.register_cache(caches["tc"])
    assert row["quality"] == caches["q"].manifest["quality"]
    with ApiServer(Settings(embedded_runner=False)) as srv:
        status, _, body = http("GET", f"{srv.url}/api/v1/dictionaries/{row['id']}")
        assert status == 200 and body["quality"] == row["quality"]
        status, _, listed = http("GET", f"{srv.url}/api/v1/dictionaries")
        assert {d["id"]: d["quality"] for d in listed}[tc["id"]]["spliced_at"] == "model.layers.1.mlp:output"
        status, _, page = http("GET", f"{srv.url}/d/{row['id']}")
        html = page.decode()
        assert status == 200 and 'id="quality"' in html and "loss recovered" in html
        assert f"{row['quality']['loss_recovered']:.4f}" in html
    without = store.register_cache(caches["noq"])  # the same dictionary and hookpoint: replaces the row
    assert without["id"] == row["id"] and without["quality"] is None

    runner = CliRunner()
    r = runner.invoke(app, ["inspect", str(caches["q"].path)])
    assert r.exit_code == 0, r.output
    q = caches["q"].manifest["quality"]
    assert "quality (first 4 windows" in r.output and f"{q['fvu']:.4f}" in r.output
    assert "loss recovered" in r.output and "L0 (latents per token)" in r.output
    assert "quality (first" not in runner.invoke(app, ["inspect", str(caches["noq"].path)]).output

    store.register_cache(caches["q"])
    r = runner.invoke(app, ["compare", str(row["id"]), str(tc["id"]), "--method", "decoder"])
    assert r.exit_code == 0, r.output
    line = next(s for s in r.output.splitlines() if s.strip().startswith("loss recovered"))
    assert line.split()[-2:] == [f"{q['loss_recovered']:.4f}", f"{caches['tc'].manifest['quality']['loss_recovered']:.4f}"]


def test_cli_no_quality(tmp_path, trained):
    from typer.testing import CliRunner

    from autointerp.cli import app

    r = CliRunner().invoke(app, ["extract", "--dictionary", str(trained["sae"]), "--n-tokens", "1024", "--ctx-len",
                                 "32", "--out", str(tmp_path / "c"), "--no-progress", "--no-quality"])
    assert r.exit_code == 0, r.output
    assert "quality" not in json.loads((tmp_path / "c" / "manifest.json").read_text())
    r = CliRunner().invoke(app, ["extract", "--dictionary", str(trained["sae"]), "--n-tokens", "1024", "--ctx-len",
                                 "32", "--out", str(tmp_path / "d"), "--no-progress", "--quality-tokens", "64"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert m["quality"]["n_windows"] == 2 and "loss recovered" in r.output
