"""Dictionary loaders: encode parity with independent float64 numpy formulas, metadata, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from dict_fixtures import make_inputs, write_gemmascope, write_saelens, write_sparsify
from needs import SPARSIFY, has_module, need

from autointerp.dictionaries import Dictionary, load_dictionary, load_dictionary_set
from autointerp.dictionaries.hub import HubRef, parse_hub_id
from autointerp.errors import ConfigError

# ---------------------------------------------------------------- independent reference encoders (numpy, float64)


def _relu(a):
    return np.maximum(a, 0.0)


def _keep_topk(v, k):
    """Zero all but the k largest entries of the last axis."""
    idx = np.argsort(-v, axis=-1)[..., :k]
    out = np.zeros_like(v)
    np.put_along_axis(out, idx, np.take_along_axis(v, idx, -1), -1)
    return out


def ref_sparsify(x, w, k, activation="topk", transcode=False):
    xin = x if transcode else x - w["b_dec"]
    pre = _relu(xin @ w["encoder.weight"].T + w["encoder.bias"])
    if activation == "topk":
        return _keep_topk(pre, k)
    g = pre.reshape(*pre.shape[:-1], k, -1)  # k contiguous groups
    out = np.zeros_like(g)
    am = g.argmax(-1)[..., None]
    np.put_along_axis(out, am, np.take_along_axis(g, am, -1), -1)
    return out.reshape(pre.shape)


def ref_saelens(x, w, arch, *, k=None, apply_b_dec=True, rescale=False, norm="none", scale=None, fn="relu"):
    if scale is not None:
        x = x * scale
    if norm == "constant_norm_rescale":
        x = x * np.sqrt(x.shape[-1]) / np.linalg.norm(x, axis=-1, keepdims=True)
    elif norm == "layer_norm":
        x = x - x.mean(-1, keepdims=True)
        x = x / (x.std(-1, ddof=1, keepdims=True) + 1e-5)
    if apply_b_dec and "transcoder" not in arch:
        x = x - w["b_dec"]
    if arch == "gated":
        gate = (x @ w["W_enc"] + w["b_gate"]) > 0
        mag = _relu(x @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"])
        return gate * mag
    pre = x @ w["W_enc"] + w["b_enc"]
    if arch in ("jumprelu", "jumprelu_transcoder"):
        return _relu(pre) * (pre > w["threshold"])
    if arch == "topk" or fn == "topk":
        if rescale:
            pre = pre * np.linalg.norm(w["W_dec"], axis=-1)
        idx = np.argsort(-pre, axis=-1)[..., :k]  # top-k of the pre-activations, then ReLU
        out = np.zeros_like(pre)
        np.put_along_axis(out, idx, _relu(np.take_along_axis(pre, idx, -1)), -1)
        return out
    return np.tanh(_relu(pre)) if fn == "tanh-relu" else _relu(pre)


def ref_gemmascope(x, w):
    pre = x @ w["W_enc"] + w["b_enc"]
    return pre * (pre > w["threshold"])


def check(d: Dictionary, x: torch.Tensor, expected: np.ndarray, atol=1e-5):
    got = d.encode(x)
    assert got.dtype == torch.float32 and got.shape == (*x.shape[:-1], d.n_latents)
    np.testing.assert_allclose(got.numpy(), expected, atol=atol, rtol=1e-5)
    assert (got != 0).any()


# ---------------------------------------------------------------- sparsify


@pytest.mark.parametrize("activation,k,n", [("topk", 4, 16), ("topk", 1, 16), ("groupmax", 4, 16), ("groupmax", 16, 32)])
def test_sparsify_parity(tmp_path, activation, k, n):
    w = write_sparsify(tmp_path / "layers.3", n=n, k=k, activation=activation)
    d = load_dictionary(tmp_path / "layers.3")
    x = make_inputs(8)
    check(d, x, ref_sparsify(x.double().numpy(), w, k, activation))
    assert (d.format, d.hookpoint, d.transcoder) == ("sparsify", "layers.3", False)
    assert (d.d_in, d.d_out, d.n_latents) == (8, 8, n)
    assert d.id == f"sparsify:{(tmp_path / 'layers.3').resolve()}" and d.source == str(tmp_path / "layers.3")
    np.testing.assert_allclose(d.decoder_directions().numpy(), w["W_dec"], rtol=1e-6)
    if activation == "groupmax":  # exactly one code per group (random data: all groups have a positive max)
        assert ((d.encode(x) != 0).reshape(3, 5, k, -1).sum(-1) <= 1).all()
    else:
        assert ((d.encode(x) != 0).sum(-1) <= k).all()


def test_sparsify_transcoder_wider_output(tmp_path):
    w = write_sparsify(tmp_path / "layers.2.mlp", d_in=8, d_out=12, transcode=True, skip=True)
    d = load_dictionary(tmp_path / "layers.2.mlp" / "sae.safetensors")  # a file path works too
    x = make_inputs(8)
    check(d, x, ref_sparsify(x.double().numpy(), w, 4, transcode=True))
    assert d.transcoder and (d.d_in, d.d_out) == (8, 12) and d.decoder_directions().shape == (16, 12)


def test_sparsify_bfloat16_checkpoint_is_cast_to_float32(tmp_path):
    w = write_sparsify(tmp_path / "h", dtype=torch.bfloat16)
    d = load_dictionary(tmp_path / "h")
    assert d.decoder_directions().dtype == torch.float32
    x = make_inputs(8)
    check(d, x, ref_sparsify(x.double().numpy(), w, 4))  # w holds the bf16-rounded values


def test_sparsify_expansion_factor_when_num_latents_is_zero(tmp_path):
    write_sparsify(tmp_path / "h", d_in=8, n=16, num_latents_in_cfg=False)  # num_latents 0, expansion_factor 2
    assert load_dictionary(tmp_path / "h").n_latents == 16


def test_to_dtype_and_batch_shapes(tmp_path):
    w = write_sparsify(tmp_path / "h")
    d = load_dictionary(tmp_path / "h").to("cpu", torch.float64)
    x = make_inputs(8, shape=(2, 3, 4))
    check(d, x, ref_sparsify(x.double().numpy(), w, 4), atol=1e-9)
    d.to(dtype=torch.bfloat16)
    assert d.encode(x[0, 0]).dtype == torch.float32 and d.encode(x[0, 0]).shape == (4, 16)
    with torch.no_grad():
        assert d.encode(x).shape == (2, 3, 4, 16)


# ---------------------------------------------------------------- SAELens


@pytest.mark.parametrize(
    "arch,opts",
    [
        ("standard", {}),
        ("standard", {"apply_b_dec_to_input": False}),
        ("jumprelu", {}),
        ("topk", {"k": 3}),
        ("topk", {"k": 3, "rescale_acts_by_decoder_norm": True}),
        ("gated", {}),
        ("standard", {"normalize_activations": "constant_norm_rescale"}),
        ("standard", {"normalize_activations": "layer_norm"}),
    ],
)
def test_saelens_6x_parity(tmp_path, arch, opts):
    w = write_saelens(tmp_path / "sae", arch=arch, **opts)
    d = load_dictionary(tmp_path / "sae")
    x = make_inputs(8)
    exp = ref_saelens(
        x.double().numpy(), w, arch, k=opts.get("k"), apply_b_dec=opts.get("apply_b_dec_to_input", True),
        rescale=opts.get("rescale_acts_by_decoder_norm", False), norm=opts.get("normalize_activations", "none"),
    )
    check(d, x, exp)
    assert (d.format, d.hookpoint, d.transcoder, d.d_in, d.n_latents) == ("saelens", "blocks.3.hook_resid_pre", False, 8, 16)
    assert d.log_sparsity is None


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder", "jumprelu_transcoder"])
def test_saelens_transcoders(tmp_path, arch):
    w = write_saelens(
        tmp_path / "tc", arch=arch, d_out=12, apply_b_dec_to_input=False,
        hook_name="blocks.1.ln2.hook_normalized", hook_name_out="blocks.1.hook_mlp_out",
    )
    d = load_dictionary(tmp_path / "tc")
    x = make_inputs(8)
    check(d, x, ref_saelens(x.double().numpy(), w, arch))
    assert d.transcoder and (d.d_in, d.d_out) == (8, 12)
    # the hookpoint is the module whose input is read (the one writing hook_name_out); the input hook is kept too
    assert d.hookpoint == "blocks.1.hook_mlp_out" and d.input_hookpoint == "blocks.1.ln2.hook_normalized"


def test_saelens_expected_average_only_in_needs_explicit_factor(tmp_path):
    w = write_saelens(tmp_path / "s", normalize_activations="expected_average_only_in")
    with pytest.raises(ConfigError, match=r"cfg\.json: normalize_activations='expected_average_only_in'.*norm_scaling_factor"):
        load_dictionary(tmp_path / "s")
    d = load_dictionary(tmp_path / "s", norm_scaling_factor=0.25)
    x = make_inputs(8)
    check(d, x, ref_saelens(x.double().numpy(), w, "standard", scale=0.25))


def test_saelens_sparsity_file(tmp_path):
    w = write_saelens(tmp_path / "s", sparsity=True)
    d = load_dictionary(tmp_path / "s")
    np.testing.assert_allclose(d.log_sparsity.numpy(), w["sparsity"], rtol=1e-6)


@pytest.mark.parametrize(
    "style,fn,opts",
    [
        ("pre6", "relu", {}),
        ("pre6", "topk", {"k": 5}),  # pre-6.0 topk: architecture standard + activation_fn_str topk + kwargs k
        ("pre6", "tanh-relu", {}),
        ("pre6", "relu", {"normalize_activations": False}),  # bool form of the old field
        ("oldest", "relu", {}),  # no architecture / apply_b_dec_to_input: standard ReLU, b_dec subtracted
    ],
)
def test_saelens_pre6_configs(tmp_path, style, fn, opts):
    w = write_saelens(tmp_path / "old", style=style, activation_fn=fn, **opts)
    d = load_dictionary(tmp_path / "old")
    x = make_inputs(8)
    check(d, x, ref_saelens(x.double().numpy(), w, "standard", k=opts.get("k"), fn=fn))
    assert d.hookpoint == "blocks.3.hook_resid_pre"


def test_saelens_bfloat16(tmp_path):
    w = write_saelens(tmp_path / "s", arch="jumprelu", dtype=torch.bfloat16, cfg_overrides={"dtype": "bfloat16"})
    x = make_inputs(8)
    check(load_dictionary(tmp_path / "s"), x, ref_saelens(x.double().numpy(), w, "jumprelu"))


# ---------------------------------------------------------------- Gemma Scope


@pytest.mark.parametrize(
    "release,hookpoint,transcoder",
    [
        ("gemma-scope-2b-pt-res", "resid_post.7", False),
        ("gemma-scope-2b-pt-mlp", "mlp_out.7", False),
        ("gemma-scope-2b-pt-att", "attn_z.7", False),
        ("gemma-scope-2b-pt-transcoders", "mlp_out.7", True),
        ("my-copy", "resid_post.7", False),  # release not named: residual stream
    ],
)
def test_gemmascope(tmp_path, release, hookpoint, transcoder):
    npz = tmp_path / release / "layer_7" / "width_16k" / "average_l0_71" / "params.npz"
    w = write_gemmascope(npz, lower_keys=release == "my-copy")
    x = make_inputs(8)
    for p in (npz, npz.parent):
        d = load_dictionary(p)
        check(d, x, ref_gemmascope(x.double().numpy(), w))
        assert (d.format, d.hookpoint, d.transcoder, d.d_in, d.n_latents) == ("gemmascope", hookpoint, transcoder, 8, 16)
        assert d.id == f"gemmascope:{npz.parent.resolve()}"


def test_gemmascope_transcoder_output_width(tmp_path):
    npz = tmp_path / "gemma-scope-2b-pt-transcoders" / "layer_3" / "width_16k" / "average_l0_9" / "params.npz"
    write_gemmascope(npz, d_out=10)
    d = load_dictionary(npz)
    assert d.transcoder and d.d_out == 10


def test_gemmascope_npz_file_of_another_name_is_the_one_loaded(tmp_path):
    from autointerp.dictionaries import load_cached_dictionary

    folder = tmp_path / "layer_7" / "width_16k" / "average_l0_71"
    a = write_gemmascope(folder / "params.npz", seed=0)
    b = write_gemmascope(folder / "my_sae.npz", seed=1)
    d = load_dictionary(folder / "my_sae.npz")
    np.testing.assert_allclose(d.decoder_directions().numpy(), b["W_dec"], rtol=1e-6)
    assert not np.allclose(b["W_dec"], a["W_dec"]) and d.id == f"gemmascope:{(folder / 'my_sae.npz').resolve()}"
    entry = {"id": d.id, "source": str(folder / "my_sae.npz"), "n_latents": d.n_latents, "d_in": d.d_in}
    np.testing.assert_allclose(load_cached_dictionary(entry).decoder_directions().numpy(), b["W_dec"], rtol=1e-6)


def test_gemmascope_parent_folder_lists_choices(tmp_path):
    for l0 in (20, 71):
        write_gemmascope(tmp_path / "layer_1" / "width_16k" / f"average_l0_{l0}" / "params.npz")
    with pytest.raises(ConfigError, match=r"holds 2 dictionaries \(average_l0_20, average_l0_71\)"):
        load_dictionary(tmp_path / "layer_1" / "width_16k")
    d = load_dictionary(tmp_path / "layer_1" / "width_16k", hookpoint="average_l0_71")
    assert d.hookpoint == "resid_post.1"  # a selector, not an override


# ---------------------------------------------------------------- neurons


def test_neurons():
    x = make_inputs(6) - 0.7
    d = load_dictionary("neurons", d_in=6, hookpoint="layers.1.mlp.act_fn")
    assert torch.equal(d.encode(x), x) and d.hookpoint == "layers.1.mlp.act_fn" and d.n_latents == 6
    assert torch.equal(d.decoder_directions(), torch.eye(6))
    t = load_dictionary("topk-neurons:2", d_in=6)
    np.testing.assert_array_equal(t.encode(x).numpy(), _keep_topk(x.numpy(), 2))
    assert t.format == "topk-neurons" and t.id == "topk-neurons:2:d_in=6"
    assert load_dictionary("x", format="topk-neurons", d_in=6, k=3).k == 3
    with pytest.raises(ConfigError, match="need d_in="):
        load_dictionary("neurons")
    with pytest.raises(ConfigError, match="k=9 must be between 1 and d_in=6"):
        load_dictionary("topk-neurons:9", d_in=6)


# ---------------------------------------------------------------- sets and selection


def test_sparsify_set_and_selection(tmp_path):
    for i, hp in enumerate(["layers.10", "layers.2", "layers.2.mlp"]):
        write_sparsify(tmp_path / hp, seed=i)
    (tmp_path / "notes.txt").write_text("x")
    s = load_dictionary_set(tmp_path)
    assert list(s) == ["layers.2", "layers.2.mlp", "layers.10"]  # natural order
    assert all(d.hookpoint == hp for hp, d in s.items())
    assert list(load_dictionary_set(tmp_path, hookpoints=["layers.10"])) == ["layers.10"]
    with pytest.raises(ConfigError, match=r"holds 3 dictionaries \(layers\.2, layers\.2\.mlp, layers\.10\); pass hookpoint="):
        load_dictionary(tmp_path)
    d = load_dictionary(tmp_path, hookpoint="layers.10")
    assert d.hookpoint == "layers.10" and d.id.endswith("layers.10")
    with pytest.raises(ConfigError, match="no dictionary in subfolder 'layers.99'"):
        load_dictionary(tmp_path, hookpoint="layers.99")


def test_single_child_is_picked_and_hookpoint_override(tmp_path):
    write_sparsify(tmp_path / "only" / "layers.4")
    assert load_dictionary(tmp_path / "only").hookpoint == "layers.4"
    assert load_dictionary(tmp_path / "only" / "layers.4", hookpoint="model.layers.4").hookpoint == "model.layers.4"


# ---------------------------------------------------------------- hub ids


def test_parse_hub_id():
    assert parse_hub_id("EleutherAI/sae-llama:layers.6") == HubRef("EleutherAI/sae-llama", None, "layers.6")
    assert parse_hub_id("g/gemma-scope-2b-pt-res@abc123:layer_3/width_16k/average_l0_9/") == HubRef(
        "g/gemma-scope-2b-pt-res", "abc123", "layer_3/width_16k/average_l0_9"
    )
    assert parse_hub_id("o/r") == HubRef("o/r", None, None)
    assert str(HubRef("o/r", "v1", "a/b")) == "o/r@v1:a/b"
    for local in ("/abs/path", "./rel/x", "a/b/c", "~/x", "nothing"):
        assert parse_hub_id(local) is None


def test_hub_download_through_a_local_cache(tmp_path):
    """The real snapshot_download path, offline, against a hand-built huggingface_hub cache folder."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-saes"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    write_sparsify(snap / "layers.1")
    write_sparsify(snap / "layers.2", seed=1)
    script = textwrap.dedent(
        """
        from autointerp.dictionaries import load_dictionary, load_dictionary_set
        from autointerp.errors import ConfigError
        d = load_dictionary("someone/tiny-saes:layers.2")
        print(d.id, d.hookpoint, d.n_latents)
        print(load_dictionary("someone/tiny-saes", hookpoint="layers.1").id)
        print(sorted(load_dictionary_set("someone/tiny-saes")))
        for bad in ("someone/tiny-saes:layers.9", "someone/missing-repo:x", "someone/tiny-saes"):
            try:
                load_dictionary(bad)
            except ConfigError as e:
                print("ERR", e)
        """
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "sparsify:someone/tiny-saes:layers.2 layers.2 16"
    assert lines[1] == "sparsify:someone/tiny-saes:layers.1"
    assert lines[2] == "['layers.1', 'layers.2']"
    assert lines[3].startswith("ERR someone/tiny-saes:layers.9: 'layers.9' not found in hub repo")
    assert lines[4].startswith("ERR someone/missing-repo:x: not a local path, and the Hugging Face Hub download failed")
    assert lines[5].startswith("ERR someone/tiny-saes: no dictionary at the hub repo's root; name one as someone/tiny-saes:<subfolder>")


# ---------------------------------------------------------------- bad input: one-line ConfigError naming the file/field


def raises(match: str, fn, *a, **kw) -> str:
    with pytest.raises(ConfigError, match=match) as ei:
        fn(*a, **kw)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_unknown_and_ambiguous_format(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "weights.bin").write_bytes(b"x")
    raises(r"empty: no dictionary files found \(found: weights\.bin\); expected cfg\.json\+sae\.safetensors \(sparsify\)", load_dictionary, tmp_path / "empty")
    write_sparsify(tmp_path / "both")
    write_saelens(tmp_path / "both")
    raises(r"both: ambiguous dictionary folder, found sae\.safetensors \(sparsify\), sae_weights\.safetensors \(saelens\)", load_dictionary, tmp_path / "both")
    assert load_dictionary(tmp_path / "both", format="saelens").format == "saelens"
    raises(r"format='pt' is not one of auto, sparsify", load_dictionary, tmp_path / "both", format="pt")
    write_sparsify(tmp_path / "sp")
    raises(r"sp: format='gemmascope' needs params\.npz here, not found \(found: cfg\.json, sae\.safetensors\)", load_dictionary, tmp_path / "sp", format="gemmascope")
    raises(r"model\.pt: not a dictionary file", load_dictionary, _touch(tmp_path / "model.pt"))


def _touch(p: Path) -> Path:
    p.write_bytes(b"\0")
    return p


def test_nonexistent_path(tmp_path):
    raises(r"/does/not/exist: no such file or folder", load_dictionary, tmp_path / "does" / "not" / "exist")
    raises(r"no such folder", load_dictionary_set, tmp_path / "nope")


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_corrupt_safetensors(tmp_path, damage):
    write_sparsify(tmp_path / "h")
    write_saelens(tmp_path / "s")
    for f in (tmp_path / "h" / "sae.safetensors", tmp_path / "s" / "sae_weights.safetensors"):
        data = f.read_bytes()
        f.write_bytes(os.urandom(200) if damage == "garbage" else data[: len(data) // 2])
        raises(rf"{f.name}: cannot read safetensors file, corrupt or truncated\?", load_dictionary, f.parent)


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_corrupt_npz(tmp_path, damage):
    npz = tmp_path / "layer_0" / "params.npz"
    write_gemmascope(npz)
    data = npz.read_bytes()
    npz.write_bytes(os.urandom(300) if damage == "garbage" else data[: len(data) - 400])
    raises(r"params\.npz: cannot read npz file, corrupt or truncated\?", load_dictionary, npz)


def test_bad_cfg_json(tmp_path):
    write_sparsify(tmp_path / "h")
    (tmp_path / "h" / "cfg.json").write_text("{not json")
    raises(r"h/cfg\.json: not valid JSON", load_dictionary, tmp_path / "h")
    write_sparsify(tmp_path / "h2", cfg_overrides={"d_in": None})
    raises(r"h2/cfg\.json: missing required field 'd_in'", load_dictionary, tmp_path / "h2")
    write_sparsify(tmp_path / "h3", cfg_overrides={"k": "many"})
    raises(r"h3/cfg\.json: field 'k' must be an integer >= 1, got 'many'", load_dictionary, tmp_path / "h3")
    write_sparsify(tmp_path / "h4", cfg_overrides={"activation": "relu"})
    raises(r"h4/cfg\.json: field 'activation' must be 'topk', 'groupmax' or 'abstopk'", load_dictionary, tmp_path / "h4")
    write_saelens(tmp_path / "s", cfg_overrides={"d_sae": None})
    raises(r"s/cfg\.json: missing required field 'd_sae'", load_dictionary, tmp_path / "s")
    write_saelens(tmp_path / "s2", arch="batchtopk")
    raises(r"s2/cfg\.json: architecture 'batchtopk' is not supported", load_dictionary, tmp_path / "s2")
    write_saelens(tmp_path / "s3", arch="topk", cfg_overrides={"k": None})
    raises(r"s3/cfg\.json: missing required field 'k'", load_dictionary, tmp_path / "s3")
    write_saelens(tmp_path / "s4")
    (tmp_path / "s4" / "cfg.json").write_text("[1, 2]")
    raises(r"s4/cfg\.json: expected a JSON object, got list", load_dictionary, tmp_path / "s4")
    write_saelens(tmp_path / "s5")
    (tmp_path / "s5" / "cfg.json").unlink()
    raises(r"s5/cfg\.json: file not found", load_dictionary, tmp_path / "s5")


def test_shape_mismatches(tmp_path):
    write_sparsify(tmp_path / "a", d_in=8, n=16, cfg_overrides={"d_in": 7})
    raises(
        r"a/sae\.safetensors: encoder\.weight has shape \(16, 8\), expected \(n_latents=16, d_in=7\) from cfg\.json",
        load_dictionary, tmp_path / "a",
    )
    write_sparsify(tmp_path / "b", n=16, cfg_overrides={"num_latents": 32})
    raises(r"b/sae\.safetensors: encoder\.weight has shape \(16, 8\), expected \(n_latents=32, d_in=8\)", load_dictionary, tmp_path / "b")
    write_sparsify(tmp_path / "c", d_out=12)  # a non-transcoder must write back to d_in
    raises(r"c/sae\.safetensors: W_dec has shape \(16, 12\), expected \(n_latents=16, d_out=8\)", load_dictionary, tmp_path / "c")
    write_sparsify(tmp_path / "k", cfg_overrides={"skip_connection": True})  # the cfg promises W_skip, no tensor
    raises(r"k/sae\.safetensors: cfg\.json says skip_connection=true but the file lacks W_skip", load_dictionary, tmp_path / "k")
    write_sparsify(tmp_path / "j", skip=True, cfg_overrides={"skip_connection": False})
    raises(r"j/sae\.safetensors: cfg\.json says skip_connection=false but the file holds W_skip", load_dictionary, tmp_path / "j")
    write_sparsify(tmp_path / "g", n=16, k=5, activation="groupmax")
    raises(r"g/cfg\.json: groupmax needs num_latents \(16\) divisible by k \(5\)", load_dictionary, tmp_path / "g")
    write_saelens(tmp_path / "s", cfg_overrides={"d_in": 9})
    raises(r"s/sae_weights\.safetensors: W_enc has shape \(8, 16\), expected \(d_in=9, d_sae=16\) from cfg\.json", load_dictionary, tmp_path / "s")
    write_saelens(tmp_path / "t", arch="transcoder", d_out=12, apply_b_dec_to_input=False, cfg_overrides={"d_out": 10})
    raises(r"t/sae_weights\.safetensors: W_dec has shape \(16, 12\), expected \(d_sae=16, d_out=10\) from cfg\.json", load_dictionary, tmp_path / "t")
    npz = tmp_path / "layer_2" / "params.npz"
    w = write_gemmascope(npz)
    np.savez(npz, **{k: (v[:-1] if k == "threshold" else v).astype(np.float32) for k, v in w.items()})
    raises(r"params\.npz: threshold has shape \(15,\), expected \(n_latents=16,\) from W_enc", load_dictionary, npz)
    np.savez(npz, **{k: v.astype(np.float32) for k, v in w.items() if k != "b_enc"})
    raises(r"params\.npz: missing tensor 'b_enc' \(found: W_dec, W_enc, b_dec, threshold\)", load_dictionary, npz)


def test_encode_rejects_wrong_width(tmp_path):
    write_sparsify(tmp_path / "layers.1")
    d = load_dictionary(tmp_path / "layers.1")
    raises(r"encode got activations with last dim 9, expected d_in=8 \(hookpoint 'layers\.1'\)", d.encode, torch.zeros(2, 9))


def test_norm_scaling_factor_only_where_it_applies(tmp_path):
    write_sparsify(tmp_path / "h")
    raises(r"norm_scaling_factor applies to saelens checkpoints only", load_dictionary, tmp_path / "h", norm_scaling_factor=2.0)
    write_saelens(tmp_path / "s")
    raises(r"norm_scaling_factor given but normalize_activations is 'none'", load_dictionary, tmp_path / "s", norm_scaling_factor=2.0)


# ---------------------------------------------------------------- parity with the real sparsify library (optional)


@pytest.mark.parametrize(
    "opts",
    [{}, {"activation": "groupmax", "k": 4}, {"transcode": True}, {"dtype": torch.bfloat16}, {"k": 1, "n": 32}],
)
def test_parity_with_eleutherai_sparsify(tmp_path, opts):
    need(has_module("sparsify"), SPARSIFY)
    from sparsify import sparse_coder
    write_sparsify(tmp_path / "layers.5", **opts)
    ref = sparse_coder.SparseCoder.load_from_disk(tmp_path / "layers.5").to(torch.float32)
    x = make_inputs(8, shape=(20,))
    with torch.no_grad():
        acts, idx, _ = ref.encode(x)
    expected = torch.zeros(20, ref.num_latents).scatter_(-1, idx, acts)
    got = load_dictionary(tmp_path / "layers.5").encode(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cfg_written_by_tests_is_sparsify_compatible(tmp_path):
    # guard for the fixture itself: the keys match sparsify's SparseCoderConfig plus d_in
    write_sparsify(tmp_path / "h")
    cfg = json.loads((tmp_path / "h" / "cfg.json").read_text())
    assert {"activation", "expansion_factor", "num_latents", "k", "transcode", "d_in"} <= set(cfg)
