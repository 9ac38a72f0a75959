"""Signed dictionaries (AbsTopK, raw neurons): both poles of a latent reach the collector as their own units, each
with its own top windows and statistics; unsigned dictionaries go through untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from autointerp.collector import Collector, CollectorConfig, SparseCodes
from autointerp.dictionaries import Poles, as_units, load_dictionary, unit_pole
from autointerp.extract import encode_for_collector
from dict_fixtures import write_saelens, write_sparsify

D, N, K, T = 16, 32, 4, 8


def _abstopk_checkpoint(folder, u: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """A sparsify-layout AbsTopK SAE whose latent 0 reads the planted direction u strongly (either sign)."""
    from safetensors.torch import save_file

    r = np.random.default_rng(seed)
    W = r.normal(size=(N, D)) * 0.05
    W[0] = 2.0 * u
    w = {"encoder.weight": W, "encoder.bias": np.zeros(N), "W_dec": r.normal(size=(N, D)), "b_dec": np.zeros(D)}
    folder.mkdir(parents=True)
    save_file({k: torch.tensor(v, dtype=torch.float32) for k, v in w.items()}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"activation": "abstopk", "k": K, "num_latents": N, "d_in": D}))
    return w


def _numpy_abstopk(x: np.ndarray, w: dict) -> np.ndarray:
    pre = (x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"]
    out = np.zeros_like(pre)
    for i, row in enumerate(pre):
        top = np.argsort(-np.abs(row), kind="stable")[:K]
        out[i, top] = row[top]
    return out


def test_abstopk_poles_collect_the_planted_direction_each_side_apart(tmp_path):
    r = np.random.default_rng(1)
    u = r.normal(size=D)
    u /= np.linalg.norm(u)
    w = _abstopk_checkpoint(tmp_path / "abs", u)
    sae = load_dictionary(tmp_path / "abs")
    assert sae.signed and sae.n_latents == N

    # 24 windows of background noise; +3u planted at some (window, position), -3u at others
    x = r.normal(size=(24, T, D)) * 0.1
    plus = {(1, 2), (5, 0), (9, 7), (17, 3)}
    minus = {(2, 4), (5, 6), (12, 1), (20, 5)}
    for b, t in plus:
        x[b, t] += 3 * u
    for b, t in minus:
        x[b, t] -= 3 * u
    xt = torch.tensor(x, dtype=torch.float32)

    codes = sae.encode(xt).numpy()
    np.testing.assert_allclose(codes.reshape(-1, N), _numpy_abstopk(x.reshape(-1, D), w), rtol=1e-5, atol=1e-5)
    assert ((codes != 0).sum(-1) == K).all()  # exactly k nonzeros on every token
    assert (codes < 0).any() and (codes > 0).any()

    units = as_units(sae)
    assert isinstance(units, Poles) and units.n_latents == 2 * N
    np.testing.assert_allclose(units.decode(units.encode(xt)).numpy(), sae.decode(sae.encode(xt)).numpy(), atol=1e-5)
    got = encode_for_collector(units, xt, torch.zeros(24, T, dtype=torch.bool))
    assert isinstance(got, SparseCodes)  # the top-k path stays sparse for a signed top-k encoder

    coll = Collector(2 * N, T, CollectorConfig(top_k=8, n_sample=8, pool_size=0), "cpu")
    coll.update(got, torch.arange(24))
    lat_counts, ids, _, cnt, pos, _ = next(coll.top.export())
    starts = np.concatenate([[0], np.cumsum(lat_counts)])
    estarts = np.concatenate([[0], np.cumsum(cnt)])

    def contexts(unit: int) -> set[tuple[int, int]]:
        """(window, position) of every nonzero activation in the unit's top windows."""
        out = set()
        for s in range(starts[unit], starts[unit + 1]):
            out |= {(int(ids[s]), int(p)) for p in pos[estarts[s]:estarts[s + 1]]}
        return out

    # the planted tokens are latent 0's largest codes on each side; noise tokens may fire it weakly too, but
    # the top windows' peaks are exactly the planted ones
    top_pos = {(int(ids[s]), int(pos[estarts[s]:estarts[s + 1]][0])) for s in range(starts[0], starts[1])}
    assert plus <= contexts(0) and not (minus & contexts(0))
    assert minus <= contexts(N) and not (plus & contexts(N))
    assert len(top_pos) == lat_counts[0]
    assert unit_pole(0, 2 * N, True) == (0, "+") and unit_pole(N, 2 * N, True) == (0, "-")
    assert unit_pole(N, 2 * N, False) == (N, None)
    # statistics per pole: the negative pole's max is the -3u tokens' magnitude
    want_neg = max(-codes[b, t, 0] for b, t in minus)
    assert coll.act_max[N].item() == pytest.approx(want_neg, rel=1e-5)
    assert coll.act_max[0].item() == pytest.approx(max(codes[b, t, 0] for b, t in plus), rel=1e-5)


def test_saelens_abstopk_config_names_the_rule(tmp_path):
    write_saelens(tmp_path / "s", arch="abstopk", d_in=8, d_sae=16, k=3)
    sae = load_dictionary(tmp_path / "s")
    assert sae.signed and sae.activation == "abstopk"
    c = sae.encode(torch.randn(5, 8))
    assert ((c != 0).sum(-1) == 3).all() and (c < 0).any()


def test_unsigned_dictionaries_are_their_own_units(tmp_path):
    """An unsigned dictionary is not wrapped: its codes reach the collector as before, byte for byte."""
    write_sparsify(tmp_path / "t", d_in=8, n=16, k=4)
    sae = load_dictionary(tmp_path / "t")
    assert not sae.signed and as_units(sae) is sae
    assert load_dictionary("topk-neurons:4", d_in=8).signed is False
    neurons = load_dictionary("neurons", d_in=8)
    assert neurons.signed and as_units(neurons).n_latents == 16
    x = torch.randn(3, 8)
    np.testing.assert_array_equal(as_units(neurons).encode(x).numpy(),
                                  torch.cat([x.clamp(min=0), (-x).clamp(min=0)], -1).numpy())


def test_signed_neurons_end_to_end_each_pole_its_own_latent(subject, small_cache, tmp_path):
    """Raw neurons at the residual stream: negative values reach the cache as the "-" poles (units n + i), the
    store marks the dictionary signed, the API, the page and the parquet export name the pole, and steering a
    "-" pole by +s is steering its "+" pole by -s."""
    import pyarrow.parquet as pq

    from api_support import ApiServer, http
    from autointerp.api import runtime
    from autointerp.scorers.intervention import steer_edit
    from autointerp.exports import export_parquet
    from autointerp.extract import extract
    from autointerp.store import Store

    (cache,) = extract(subject, "neurons", "resid_post.0", "builtin", tmp_path / "c", n_tokens=1024, ctx_len=32,
                       batch_size=8, top_k=4, n_sample=4, pool_size=8, progress=False)
    width = subject.width("resid_post.0")
    assert cache.n_latents == 2 * width
    m = cache.manifest["dictionary"]
    assert m["signed"] is True and m["n_base"] == width
    freq = np.asarray(cache.stats["n_active"])
    # every residual dimension takes both signs on real text: both poles fire, and "+" and "-" never share a token
    assert (freq[:width] > 0).mean() > 0.9 and (freq[width:] > 0).mean() > 0.9
    assert (freq[:width] + freq[width:] <= cache.n_tokens).all()
    i = int(np.argmax(freq[width:]))
    (row, *_), (acts, *_) = cache.kept("top", width + i)
    toks = cache.windows([row])[0].astype(np.int64)
    x = subject.capture(torch.tensor(toks[None]), ["resid_post.0"])["resid_post.0"][0, :, i]
    peak = int(np.argmax(acts))
    assert x[peak].item() < 0 and acts[peak] == pytest.approx(-x[peak].item(), rel=0.02)  # 8-bit per-window values

    store = Store()
    d = store.register_cache(cache, name="neurons-signed")
    assert d["signed"] and d["n_latents"] == 2 * width
    with ApiServer(store=store) as api:
        status, _, got = http("GET", f"{api.url}/api/v1/dictionaries/neurons-signed/latents/{width + i}")
        assert status == 200 and got["pole"] == "-" and got["base_latent"] == i
        status, _, got = http("GET", f"{api.url}/api/v1/dictionaries/neurons-signed/latents/{i}")
        assert got["pole"] == "+" and got["base_latent"] == i
        status, _, page = http("GET", f"{api.url}/api/v1/dictionaries/neurons-signed/latents?limit=3&sort=index")
        assert [r["pole"] for r in page["items"]] == ["+"] * 3
        status, _, html = http("GET", f"{api.url}/d/neurons-signed/{width + i}")
        assert status == 200 and b"negative pole" in html and f"#{i}-".encode() in html
    export_parquet(store, "neurons-signed", tmp_path / "pq")
    lat = pq.read_table(tmp_path / "pq" / "latents.parquet").to_pydict()
    assert lat["pole"][width + i] == "-" and lat["base_latent"][width + i] == i and lat["pole"][i] == "+"

    # another store's dictionary row 1 steered first: the steering target must not be reused for ours (it was
    # cached by the row id, which every new store starts at)
    other = Store(f"sqlite:///{tmp_path / 'other.db'}")
    d_other = other.register_cache(small_cache, name="other")
    assert d_other["id"] == d["id"]
    runtime.steer(d_other, [steer_edit(0)], "The river", [1.0], 4, store=other)
    steered = runtime.steer(d, [steer_edit(width + i)], "The river", [1.0, -1.0], 4, store=store)["completions"]
    mirror = runtime.steer(d, [steer_edit(i)], "The river", [-1.0, 1.0], 4, store=store)["completions"]
    assert [c["completion"] for c in steered] == [c["completion"] for c in mirror]
    assert steered[0]["completion"] != steered[1]["completion"]  # the two signs really steer apart
    sweep = runtime.steer(d, [steer_edit(i)], "The river", None, 2, store=store)["completions"]  # a pole's default: both signs
    assert [c["strength"] for c in sweep] == [-2.0, -1.0, 0.0, 1.0, 2.0]
