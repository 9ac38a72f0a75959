"""SNMF MLP features: the fit (Ding et al. semi-NMF), the folder format and its loader, NNLS encoding against scipy,
the fitted codes G published as a cache, extraction at mlp_neurons.N, steering there, and bad files.

The real SmolLM2 layer-5 MLP hidden units (1536 wide); a K=64 fit on 2048 tokens, 20 updates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy.optimize import nnls

from autointerp.corpus import CorpusSpec
from autointerp.dictionaries import load_cached_dictionary, load_dictionary
from autointerp.dictionaries.snmf import SnmfDictionary, save_snmf
from autointerp.errors import ConfigError
from autointerp.snmf_fit import collect_windows, fit_snmf, fit_snmf_folder
from autointerp.snmf_import import import_snmf_codes
from autointerp.steering import steer

HP, K, CTX = "mlp_neurons.5", 64, 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """Python's pydoc topics (real English prose about code), one document a line: the text of the `builtin`
    corpus without the stdlib docstring scan it adds (~15 s on this machine)."""
    import pydoc_data.topics as topics

    path = tmp_path_factory.mktemp("corpus") / "topics.jsonl"
    path.write_text("\n".join(json.dumps({"text": topics.topics[k]}) for k in sorted(topics.topics)))
    return str(path)


@pytest.fixture(scope="module")
def fitted(subject, corpus, tmp_path_factory):
    spec = CorpusSpec(source=corpus, n_tokens=2048, ctx_len=CTX, seed=0)
    windows, acts, ignore = collect_windows(subject, HP, spec)
    F, G_kept = fit_snmf(acts[~ignore], K, n_iter=20, seed=0)
    G = torch.zeros(len(acts), K)
    G[~ignore] = G_kept
    folder = tmp_path_factory.mktemp("snmf") / "l5"
    save_snmf(folder, F, G, tokens=windows, cfg={"hookpoint": HP, "model": subject.spec})
    return dict(folder=folder, windows=windows, acts=acts, ignore=ignore, F=F, G=G)


@pytest.fixture
def one_thread():
    # the synthetic fit is hundreds of tiny matmuls: on a busy machine, waking a second thread costs more than them
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_fit_recovers_a_semi_nmf_and_F_is_least_squares(one_thread):
    g = torch.Generator().manual_seed(1)
    F0 = torch.randn(40, 5, generator=g)  # mixed sign
    G0 = torch.rand(600, 5, generator=g) * (torch.rand(600, 5, generator=g) < 0.4)  # >= 0, sparse
    X = G0 @ F0.T  # tokens × d, an exact rank-5 semi-NMF
    errs = []
    for n_iter in (0, 5, 20, 100, 300):
        F, G = fit_snmf(X, 5, n_iter=n_iter, seed=0)
        errs.append(float((X - G @ F.T).norm() / X.norm()))
    assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:])), errs  # the updates never increase the error
    assert errs[0] > 0.3 and errs[-1] < 5e-3, errs
    assert (G >= 0).all()
    torch.testing.assert_close(F.norm(dim=0), torch.ones(5), atol=1e-5, rtol=0)
    # F solves min ‖X − G Fᵀ‖ for the final G: the residual is orthogonal to G's columns (float64, numpy)
    Xn, Fn, Gn = X.double().numpy(), F.double().numpy(), G.double().numpy()
    R = Xn - Gn @ Fn.T
    assert np.abs(Gn.T @ R).max() < 1e-4 * np.abs(Gn.T @ Xn).max()
    F2, G2 = fit_snmf(X, 5, n_iter=20, seed=0)
    assert torch.equal(F2, fit_snmf(X, 5, n_iter=20, seed=0)[0]) and not torch.equal(F2, fit_snmf(X, 5, n_iter=20,
                                                                                                 seed=1)[0])


def test_fitted_folder_loads_and_encodes_as_scipy_nnls(fitted):
    d = load_dictionary(fitted["folder"])
    assert isinstance(d, SnmfDictionary)
    assert (d.format, d.hookpoint, d.d_in, d.d_out, d.n_latents, d.signed, d.transcoder) == \
        ("snmf", HP, 1536, 1536, K, False, False)
    assert d.id == f"snmf:{fitted['folder'].resolve()}"
    F = fitted["F"]
    assert torch.equal(d.decoder_directions(), F.T)
    acts = fitted["acts"][~fitted["ignore"]]
    # real tokens (the fit's features cover most of them, so most codes are > 0) and tokens built to need zeros:
    # x = F g with half of g negative, plus noise; scipy's active-set NNLS is the reference
    gen = torch.Generator().manual_seed(0)
    g_mixed = torch.randn(4, K, generator=gen)
    built = g_mixed @ F.T + 0.05 * torch.randn(4, 1536, generator=gen)
    x = torch.cat([acts[torch.arange(0, len(acts), len(acts) // 6)], built])
    codes = d.encode(x)
    assert codes.dtype == torch.float32 and codes.shape == (len(x), K)
    Fn = F.double().numpy()
    for i in range(len(x)):
        ref, _ = nnls(Fn, x[i].double().numpy(), maxiter=10 * K)
        err = np.linalg.norm(codes[i].double().numpy() - ref) / np.linalg.norm(ref)
        assert err < 1e-4, (i, err)
        assert ((codes[i] > 0).numpy() == (ref > 0)).all(), i
    assert (codes[-4:] == 0).sum() >= 8  # the built tokens did exercise the constraint
    torch.testing.assert_close(d.decode(codes), codes @ F.T)
    torch.testing.assert_close(d.reconstruct(x), codes @ F.T)
    # leading dims are kept, and a token's codes do not depend on its batch
    torch.testing.assert_close(d.encode(x[:6].reshape(2, 3, -1)).reshape(6, K), codes[:6], atol=1e-6, rtol=1e-5)


def test_imported_codes_top_windows_are_the_argsort_of_G(fitted, subject, tmp_path):
    top_k = 6
    cache = import_snmf_codes(fitted["folder"], tmp_path / "cache", top_k=top_k, n_sample=8, pool_size=16,
                              subject=subject)
    G, windows = fitted["G"].numpy(), fitted["windows"]
    W = len(windows)
    assert (cache.n_latents, cache.n_tokens, cache.ctx_len) == (K, W * CTX, CTX)
    assert cache.manifest["hookpoint"] == HP and cache.manifest["model"] == subject.spec
    wmax = G.reshape(W, CTX, K).max(axis=1)  # [windows, K]: each factor's largest code per window
    for j in (0, 17, 40, K - 1):
        order = np.argsort(-wmax[:, j], kind="stable")[:top_k]  # ties: lower window first, as the collector
        rows, acts = cache.kept("top", j)
        assert np.array_equal(cache.windows(rows), windows[order]), j
        assert np.array_equal(acts.max(axis=1), wmax[order, j]), j  # a window's max is stored exactly
        s = cache.latent_stats(j)
        assert s.n_active == int((G[:, j] > 0).sum()) and s.max_act == pytest.approx(float(G[:, j].max()))
    # the cache names the SNMF folder: F reloads from it
    d = load_cached_dictionary(cache.manifest["dictionary"])
    assert torch.equal(d.decoder_directions(), fitted["F"].T)
    # the same import again is done already; an extraction's cache of another run is never overwritten by it
    assert import_snmf_codes(fitted["folder"], tmp_path / "cache", top_k=top_k, n_sample=8, pool_size=16,
                             subject=subject).manifest["created"] == cache.manifest["created"]
    with pytest.raises(ConfigError, match="another run"):
        import_snmf_codes(fitted["folder"], tmp_path / "cache", top_k=top_k + 1, n_sample=8, pool_size=16)


def test_extract_with_the_snmf_dictionary(fitted, subject, corpus, tmp_path):
    from autointerp.extract import extract

    (cache,) = extract(subject, str(fitted["folder"]), HP, corpus, tmp_path / "x", n_tokens=2048, ctx_len=CTX,
                       batch_size=32, top_k=4, n_sample=4, pool_size=8, progress=False)
    assert cache.n_latents == K and cache.n_tokens == 2048 and cache.manifest["hookpoint"] == HP
    assert cache.manifest["dictionary"]["id"] == f"snmf:{fitted['folder'].resolve()}"
    # a kept maximum is the NNLS code of that token, recomputed here from the model's activations with scipy
    j = int(np.argmax(cache.stats["act_max"]))
    rows, acts = cache.kept("top", j)
    tokens = torch.from_numpy(cache.windows(rows[:1])).long()
    x = subject.capture(tokens, [HP])[HP][0].double().numpy()
    pos = int(acts[0].argmax())
    ref, _ = nnls(fitted["F"].double().numpy(), x[pos], maxiter=10 * K)
    assert acts[0, pos] == pytest.approx(ref[j], rel=1e-3)


def test_steering_a_factor_at_the_neurons_equals_its_image_at_the_mlp_output(fitted, subject):
    model = subject.model
    down = subject.hookpoint(HP).module  # mlp_neurons.N reads the input of the down projection
    assert getattr(down, "bias", None) is None
    ids = subject.tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    j, alpha = 9, 6.0
    f = fitted["F"][:, j]
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with steer(model, HP, f, alpha):
            at_neurons = model(input_ids=ids).logits
        with steer(model, "mlp_out.5", down.weight.detach().float() @ f, alpha):
            at_output = model(input_ids=ids).logits
    assert (at_neurons - clean).abs().max() > 1e-2  # the steering did something
    torch.testing.assert_close(at_neurons, at_output, atol=1e-4, rtol=0)


def test_fit_snmf_folder_and_cli(subject, corpus, tmp_path, monkeypatch):
    spec = CorpusSpec(source=corpus, n_tokens=256, ctx_len=CTX, seed=3)
    path = fit_snmf_folder(subject, HP, spec, tmp_path / "f", k=8, n_iter=5, seed=2)
    d = load_dictionary(path)
    windows, acts, ignore = collect_windows(subject, HP, spec)
    F, _ = fit_snmf(acts[~ignore], 8, n_iter=5, seed=2)
    torch.testing.assert_close(d.decoder_directions(), F.T)
    from autointerp.dictionaries.snmf import SnmfFiles

    files = SnmfFiles(path)
    G = files.G()
    assert np.array_equal(files.tokens(), windows) and ignore.any()
    assert (G[ignore] == 0).all() and (G[~ignore] > 0).any(dim=1).all()  # ignored positions: no codes
    assert files.cfg["corpus"]["seed"] == 3 and files.cfg["d_mlp"] == 1536

    # the CLI command: the same fit, plus the codes published as a cache (the session's model, not a second load)
    from typer.testing import CliRunner

    import autointerp.subject as subject_mod
    from autointerp.cli import app

    monkeypatch.setattr(subject_mod, "load_subject", lambda *a, **k: subject)
    r = CliRunner().invoke(app, ["fit-snmf", "--hookpoint", HP, "--corpus", corpus, "--n-tokens", "256",
                                 "--ctx-len", str(CTX), "--k", "8", "--n-iter", "5", "--seed", "3", "--out", str(tmp_path / "cli"),
                                 "--cache", str(tmp_path / "cli-cache")])
    assert r.exit_code == 0, r.output
    assert load_dictionary(tmp_path / "cli").n_latents == 8
    from autointerp.cache import LatentCache

    assert LatentCache(tmp_path / "cli-cache").n_tokens == 256


# ------------------------------------------------------------------------------------------------- bad files


def _write(folder, tensors, cfg):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "snmf.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


F_OK = torch.randn(16, 4)
CFG = {"hookpoint": HP, "model": "builtin:smollm2"}
BAD = {
    "missing F": ({"G": torch.rand(8, 4), "tokens": torch.zeros(2, 4, dtype=torch.int32)}, CFG, "missing tensor 'F'"),
    "F not 2-D": ({"F": torch.randn(16)}, CFG, r"F has shape \(16,\), expected 2 dims"),
    "F ints": ({"F": torch.ones(16, 4, dtype=torch.int32)}, CFG, "F has dtype I32"),
    "d_mlp vs cfg": ({"F": F_OK}, {**CFG, "d_mlp": 32}, "F has 16 rows but cfg.json says d_mlp=32"),
    "no hookpoint": ({"F": F_OK}, {"model": "m"}, "field 'hookpoint'"),
    "G wrong K": ({"F": F_OK, "G": torch.rand(8, 5), "tokens": torch.zeros(2, 4, dtype=torch.int32)}, CFG,
                  r"G has shape \(8, 5\)"),
    "G without tokens": ({"F": F_OK, "G": torch.rand(8, 4)}, CFG, "not the tokens it was fitted on"),
    "tokens count": ({"F": F_OK, "G": torch.rand(8, 4), "tokens": torch.zeros(3, 4, dtype=torch.int32)}, CFG,
                     "G has 8 rows but the tokens are 3 windows × 4"),
    "cfg tokens ragged": ({"F": F_OK, "G": torch.rand(8, 4)}, {**CFG, "tokens": [[1, 2, 3, 4], [5, 6]]},
                          "field 'tokens' must be"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_give_one_line_errors(tmp_path, case):
    tensors, cfg, msg = BAD[case]
    folder = _write(tmp_path / "d", tensors, cfg)
    with pytest.raises(ConfigError, match=msg) as e:
        load_dictionary(folder)
    assert "\n" not in str(e.value) and str(folder) in str(e.value)


def test_tokens_in_cfg_and_negative_codes(tmp_path):
    folder = _write(tmp_path / "ok", {"F": F_OK, "G": torch.rand(8, 4)},
                    {**CFG, "tokens": [[1, 2, 3, 4], [5, 6, 7, 8]]})
    cache = import_snmf_codes(folder, tmp_path / "c", top_k=2, n_sample=2, pool_size=2)
    assert np.array_equal(cache.windows([0, 1]), [[1, 2, 3, 4], [5, 6, 7, 8]])
    bad = _write(tmp_path / "neg", {"F": F_OK, "G": -torch.rand(8, 4), "tokens": torch.ones(2, 4, dtype=torch.int32)},
                 CFG)
    with pytest.raises(ConfigError, match="negative or non-finite codes"):
        import_snmf_codes(bad, tmp_path / "c2")
    with pytest.raises(ConfigError, match="holds no codes"):
        import_snmf_codes(_write(tmp_path / "noG", {"F": F_OK}, CFG), tmp_path / "c3")


def test_d_mlp_mismatch_with_the_hookpoint(subject, corpus, tmp_path):
    from autointerp.extract import extract

    folder = save_snmf(tmp_path / "wide", torch.randn(1000, 4), torch.rand(64, 4), tokens=np.ones((2, 32)),
                       cfg={"hookpoint": HP, "model": subject.spec})
    with pytest.raises(ConfigError, match="d_in=1000 but hookpoint mlp_neurons.5") as e:
        extract(subject, str(folder), None, corpus, tmp_path / "x", n_tokens=64, ctx_len=32, progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="F has d_mlp=1000 rows but hookpoint mlp_neurons.5") as e:
        import_snmf_codes(folder, tmp_path / "c", subject=subject)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="width 1536"):  # steering F's column at the neurons
        with steer(subject.model, HP, torch.randn(1000), 1.0):
            subject.model(input_ids=torch.tensor([[1, 2]]))
