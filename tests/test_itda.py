"""ITDA: dictionaries built here from SmolLM2 activations (layers 3, 14, 15, the same tokens), the public folder
layout, matching-pursuit encode parity with an independent float64 numpy loop, the greedy build rule, negative
poles in an extraction, whole-dictionary similarity (Jaccard of atom indices, linear CKA) and bad files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from typer.testing import CliRunner

from autointerp.corpus import CorpusSpec, iter_windows
from autointerp.dictionaries import load_dictionary
from autointerp.errors import ConfigError
from autointerp.itda_build import build_itda, save_itda
from autointerp.similarity import itda_jaccard, linear_cka

LAYERS = (3, 14, 15)
K, THRESHOLD, MAX_ATOMS = 8, 1e-3, 512
SPEC = CorpusSpec(source="builtin", ctx_len=64, n_tokens=2048)  # 32 windows: pydoc topics + stdlib docstrings


# ---------------------------------------------------------------- independent references (numpy, float64)


def ref_mp(atoms: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """Matching pursuit as the paper states it: k times pick argmax_j |r·a_j|, add r·a_j to code j, r -= (r·a_j) a_j."""
    d, r = atoms.astype(np.float64), x.astype(np.float64).copy()
    codes = np.zeros((len(x), len(atoms)))
    rows = np.arange(len(x))
    for _ in range(k):
        c = r @ d.T
        j = np.abs(c).argmax(axis=1)
        coef = c[rows, j]
        np.add.at(codes, (rows, j), coef)
        r -= coef[:, None] * d[j]
    return codes


def ref_error(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The reference trainer's error: mean over dims of (x/|x| - r/|r|)², norms clamped at 1e-9."""
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)
    rn = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-9)
    return ((xn - rn) ** 2).mean(axis=1)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def windows(subject):
    return np.concatenate(list(iter_windows(SPEC, subject.tokenizer, 32)))


@pytest.fixture(scope="module")
def acts(subject, windows):
    """resid_post activations [windows, ctx, d] float64 at each layer, captured independently of the builder."""
    got = subject.capture(torch.from_numpy(windows).long(), [f"resid_post.{layer}" for layer in LAYERS])
    return {layer: got[f"resid_post.{layer}"].double().numpy() for layer in LAYERS}


@pytest.fixture(scope="module")
def built(subject, tmp_path_factory):
    out = tmp_path_factory.mktemp("itda")
    return build_itda(subject, list(LAYERS), SPEC, out, k=K, threshold=THRESHOLD, max_atoms=MAX_ATOMS, batch_size=1)


@pytest.fixture(scope="module")
def dicts(built):
    return {layer: load_dictionary(folder) for layer, folder in built.items()}


# ---------------------------------------------------------------- the build and the folder layout


def test_public_layout_and_metadata(built, dicts):
    import yaml

    for layer, folder in built.items():
        assert sorted(p.name for p in folder.iterdir()) == ["atom_indices.pt", "atoms.pt", "metadata.yaml"]
        meta = yaml.safe_load((folder / "metadata.yaml").read_text())
        assert (meta["k"], meta["layer"], meta["seq_len"], meta["dataset"]) == (K, layer, 64, "builtin")
        atoms = torch.load(folder / "atoms.pt", weights_only=True)
        idx = torch.load(folder / "atom_indices.pt", weights_only=True)
        assert atoms.ndim == 2 and atoms.shape[1] == 576
        assert idx.shape == (atoms.shape[0], 2) and idx.dtype == torch.int64
        d = dicts[layer]
        assert (d.format, d.hookpoint, d.signed, d.k, d.n_latents, d.d_in) == ("itda", f"resid_post.{layer}", True, K,
                                                                               atoms.shape[0], 576)
        assert 20 < d.n_latents <= MAX_ATOMS
        torch.testing.assert_close(atoms.norm(dim=1), torch.ones(len(atoms)), atol=1e-5, rtol=0)


def test_atoms_are_the_activations_their_indices_name(dicts, acts):
    """atom i == the normalised activation at (sequence, token) atom_indices[i] of the prompt windows, in order."""
    for layer, d in dicts.items():
        seq, tok = d.atom_indices.numpy().T
        x = acts[layer][seq, tok]
        np.testing.assert_allclose(d.atoms.numpy(), x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-6)
        assert len(set(zip(seq.tolist(), tok.tolist()))) == len(seq)  # a token joins once
        assert (np.diff(seq * 64 + tok) > 0).all()  # atoms join in stream order


def test_greedy_rule_against_reference(dicts, acts):
    """Replayed with the reference loop (every 4th sequence: the float64 loop is the slow part): a token joined iff
    the atoms from earlier sequences reconstruct it with error > threshold (tokens within 1e-6 of it not judged)."""
    for layer, d in dicts.items():
        atoms, seq = d.atoms.double().numpy(), d.atom_indices[:, 0].numpy()
        joined = set(map(tuple, d.atom_indices.tolist()))
        for s in range(0, acts[layer].shape[0], 4):
            x = acts[layer][s]
            before = atoms[seq < s]
            err = ref_error(x, ref_mp(before, x, K) @ before) if len(before) else np.full(len(x), 1 / x.shape[1])
            want = {(s, t) for t in np.flatnonzero(err > THRESHOLD)}
            clear = {(s, t) for t in np.flatnonzero(np.abs(err - THRESHOLD) > 1e-6)}
            assert want & clear == {(s2, t) for s2, t in joined if s2 == s} & clear, (layer, s)


# ---------------------------------------------------------------- encode


def test_codes_equal_reference_matching_pursuit(dicts, acts):
    for layer, d in dicts.items():
        x = acts[layer][24:28].reshape(-1, 576)  # 256 tokens
        got = d.encode(torch.from_numpy(x).float()).double().numpy()
        want = ref_mp(d.atoms.double().numpy(), x, K)
        scale = np.linalg.norm(x, axis=1, keepdims=True)  # codes are in activation units: compare relative to |x|
        np.testing.assert_allclose(got / scale, want / scale, atol=1e-5, rtol=0)
        assert (want < -1e-3 * scale).any() and (want > 1e-3 * scale).any()  # signed codes
        # what it writes back: x minus the final residual of the same loop
        recon = d.reconstruct(torch.from_numpy(x).float()).double().numpy()
        np.testing.assert_allclose(recon / scale, (want @ d.atoms.double().numpy()) / scale, atol=1e-5, rtol=0)


def test_encode_topk_distinct_and_equal_to_dense(dicts, acts, monkeypatch):
    import autointerp.dictionaries.itda as itda

    d = dicts[3]
    x = torch.from_numpy(acts[3][:2]).float()  # [2, 64, d]: leading dims kept
    dense = d.encode(x)
    monkeypatch.setattr(itda, "ENCODE_CHUNK_BYTES", 12 * d.n_latents * 7)  # 7 tokens a chunk: same codes
    chunked = d.encode(x)
    torch.testing.assert_close(chunked, dense, atol=1e-4, rtol=1e-5)  # matmul blocking differs by shape
    vals, idx = d.encode_topk(x)  # chunked the same way: exactly the same codes
    assert vals.shape == idx.shape == (2, 64, K)
    flat = idx.reshape(-1, K)
    assert all(len(set(row.tolist())) == K for row in flat)  # distinct per token, even where an atom came twice
    torch.testing.assert_close(torch.zeros_like(dense).scatter_(-1, idx, vals), chunked, atol=0, rtol=0)
    # an atom's own activation: one step takes all of it (|x|), the other steps find ~nothing
    s, t = d.atom_indices[5].tolist()
    own = d.encode(torch.from_numpy(acts[3][s, t]).float())
    norm = float(np.linalg.norm(acts[3][s, t]))
    assert abs(float(own[5]) - norm) < 1e-4 * norm and float(own.abs().sum() - own[5].abs()) < 1e-3 * norm


def test_repicked_atoms_add_and_topk_pads(tmp_path):
    """Atoms 0 and 1 span the plane x lies in, 0.3 rad apart: pursuit alternates between them, so each is picked
    twice in k=4 steps and their codes are sums; the other atoms never correlate enough."""
    c, s_ = np.cos(0.3), np.sin(0.3)
    atoms = np.array([[1, 0, 0], [c, s_, 0], [0, 0, 1], [0, 0, -1], [0.1, 0, np.sqrt(0.99)]])
    x = np.array([[1.0, 0.5, 0.0], [-1.0, -0.5, 0.0]])
    save_itda(tmp_path / "syn", torch.tensor(atoms, dtype=torch.float32), torch.arange(10).view(5, 2), {"k": 4})
    d = load_dictionary(tmp_path / "syn")
    assert d.hookpoint is None  # no layer in the metadata
    want = ref_mp(atoms, x, 4)
    first = x @ atoms[1]  # the first step alone: less than the sum
    assert (np.count_nonzero(want, axis=1) == 2).all() and abs(want[0, 1]) > abs(first[0]) + 1e-3
    np.testing.assert_allclose(d.encode(torch.tensor(x, dtype=torch.float32)).numpy(), want, atol=1e-6)
    vals, idx = d.encode_topk(torch.tensor(x, dtype=torch.float32))
    assert vals.shape == (2, 4) and all(len(set(r)) == 4 for r in idx.tolist())  # 2 atoms + 2 distinct pads
    np.testing.assert_allclose(np.sort(np.abs(vals.numpy()), axis=1)[:, :2], 0)
    torch.testing.assert_close(torch.zeros(2, 5).scatter_(-1, idx, vals), torch.tensor(want, dtype=torch.float32))
    assert (want[0] > 0).any() and (want[0] < 0).any()  # non-orthogonal atoms: the second pick goes the other way


def test_negative_poles_reach_the_cache(subject, built, dicts, windows, acts, tmp_path):
    from autointerp.cache import LatentCache
    from autointerp.extract import extract

    d = dicts[14]
    n = d.n_latents
    # quality off: its spliced full-model passes are the quality tests' subject, and would double this test's time
    (cache,) = extract(subject, str(built[14]), None, "builtin", tmp_path / "cache", n_tokens=2048, ctx_len=64,
                       batch_size=16, top_k=8, n_sample=8, pool_size=16, progress=False, max_norm_ratio=0,
                       quality=False)
    cache = LatentCache(cache.path)
    assert cache.n_latents == 2 * n and cache.manifest["dictionary"]["id"] == d.id
    # independently: encode the cached windows (the same as the build's), drop special tokens (the collector ignores
    # them), split the poles
    win = torch.from_numpy(cache.windows(np.arange(cache.n_windows_stored))).long()
    assert np.array_equal(win.numpy(), windows)
    codes = d.encode(torch.from_numpy(acts[14]).float()).reshape(-1, n)
    codes[subject.special_token_mask(win).reshape(-1)] = 0
    act_max = cache.stats["act_max"]
    np.testing.assert_allclose(act_max[n:], (-codes).clamp(min=0).max(0).values.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(act_max[:n], codes.clamp(min=0).max(0).values.numpy(), rtol=1e-4, atol=1e-4)
    neg_units = np.flatnonzero(act_max[n:] > 1.0) + n
    assert len(neg_units) > n // 10  # many latents fire on their negative pole
    rows, acts_ = cache.kept("top", int(neg_units[0]))
    assert len(rows) and acts_.max() > 1.0  # with stored examples
    # stored: the comparison by the store's names (as the API runs it) reads the atoms of the checkpoints
    from autointerp.compare import compare
    from autointerp.store import open_store

    store = open_store()
    name = store.register_cache(cache, name="itda14")["name"]
    assert compare(store, name, name, "itda-jaccard")["summary"]["jaccard"] == 1.0
    assert compare(store, name, name, "decoder")["summary"]["itda_jaccard"] == 1.0


# ---------------------------------------------------------------- whole-dictionary similarity


def test_itda_jaccard(built, dicts):
    for a in LAYERS:
        for b in LAYERS:
            sa = {tuple(r) for r in dicts[a].atom_indices.tolist()}
            sb = {tuple(r) for r in dicts[b].atom_indices.tolist()}
            assert itda_jaccard(built[a], built[b]) == len(sa & sb) / len(sa | sb)  # exact
    assert itda_jaccard(built[15], built[15]) == 1.0 == itda_jaccard(dicts[3], built[3] / "atoms.pt")
    j_near, j_far = itda_jaccard(built[15], built[14]), itda_jaccard(built[15], built[3])
    assert j_near > j_far, (j_near, j_far)  # adjacent layers share more atoms than distant ones


def test_cli_compare_itda_jaccard(built):
    from autointerp import cli

    res = CliRunner().invoke(cli.app, ["compare", str(built[15]), str(built[14]), "--method", "itda-jaccard"])
    assert res.exit_code == 0, res.output
    assert f"{itda_jaccard(built[15], built[14]):.4f}" in res.output


def _ref_cka(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC form with an explicit centring matrix: tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)), K = X Xᵀ."""
    h = np.eye(len(x)) - 1 / len(x)
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float(np.trace(k @ l_) / np.sqrt(np.trace(k @ k) * np.trace(l_ @ l_)))


def test_linear_cka(dicts, acts):
    x = acts[14][:4].reshape(-1, 576)  # 256 tokens, codes of layers 14 and 15 on them
    ca = dicts[14].encode(torch.from_numpy(x).float()).double().numpy()
    cb = dicts[15].encode(torch.from_numpy(acts[15][:4].reshape(-1, 576)).float()).double().numpy()
    want = _ref_cka(ca, cb)
    assert linear_cka(ca, cb) == pytest.approx(want, rel=1e-9)
    assert linear_cka(sp.csr_matrix(ca), sp.csc_matrix(cb)) == pytest.approx(want, rel=1e-9)
    assert linear_cka(ca, ca) == pytest.approx(1.0, rel=1e-12)
    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.normal(size=(ca.shape[1], ca.shape[1])))[0]
    assert linear_cka(ca, 3.0 * ca @ q + 5.0) == pytest.approx(1.0, rel=1e-9)  # invariant: rotation, scale, shift
    wide = rng.normal(size=(40, 900))  # more features than tokens: the token-Gram path
    assert linear_cka(wide, wide[:, :30] ** 2) == pytest.approx(_ref_cka(wide, wide[:, :30] ** 2), rel=1e-9)
    with pytest.raises(ConfigError, match="same tokens"):
        linear_cka(ca, cb[:10])


# ---------------------------------------------------------------- bad files


def _copy(folder, tmp_path):
    dst = tmp_path / "bad"
    shutil.copytree(folder, dst)
    return dst


def _one_line_error(folder, *names) -> str:
    with pytest.raises(ConfigError) as e:
        load_dictionary(folder)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in names), msg
    return msg


@pytest.mark.parametrize("case", ["transposed", "rank3", "rank1", "indices_transposed", "indices_float",
                                  "not_unit", "missing_indices", "missing_metadata", "k_zero", "not_a_tensor"])
def test_bad_files(built, tmp_path, case):
    f = _copy(built[3], tmp_path)
    atoms = torch.load(f / "atoms.pt", weights_only=True)
    idx = torch.load(f / "atom_indices.pt", weights_only=True)
    n = len(atoms)
    if case == "transposed":
        torch.save(atoms.T.contiguous(), f / "atoms.pt")
        msg = _one_line_error(f, "atoms.pt", "atom_indices.pt", f"(576, {n})", f"({n}, 2)")
        assert "transposed" in msg
    elif case == "rank3":
        torch.save(atoms[None], f / "atoms.pt")
        _one_line_error(f, "atoms.pt", f"(1, {n}, 576)")
    elif case == "rank1":
        torch.save(atoms.reshape(-1), f / "atoms.pt")
        _one_line_error(f, "atoms.pt", f"({n * 576},)")
    elif case == "indices_transposed":
        torch.save(idx.T.contiguous(), f / "atom_indices.pt")
        _one_line_error(f, "atom_indices.pt", f"(2, {n})", f"({n}, 576)")
    elif case == "indices_float":
        torch.save(idx.float(), f / "atom_indices.pt")
        _one_line_error(f, "atom_indices.pt", "float32")
    elif case == "not_unit":
        torch.save(atoms * 3, f / "atoms.pt")
        _one_line_error(f, "atoms.pt", "unit")
    elif case == "missing_indices":
        (f / "atom_indices.pt").unlink()
        _one_line_error(f, "atom_indices.pt", "not found")
    elif case == "missing_metadata":
        (f / "metadata.yaml").unlink()
        _one_line_error(f, "metadata.yaml", "not found")
    elif case == "k_zero":
        save_itda(f, atoms, idx, {"k": 0, "layer": 3})
        _one_line_error(f, "metadata.yaml", "'k'")
    else:
        torch.save({"atoms": atoms}, f / "atoms.pt")
        _one_line_error(f, "atoms.pt", "dict")


def test_missing_atoms_file(built, tmp_path):
    f = _copy(built[3], tmp_path)
    (f / "atoms.pt").unlink()
    with pytest.raises(ConfigError) as e:
        load_dictionary(f, format="itda")
    assert "\n" not in str(e.value) and "atoms.pt" in str(e.value)
    with pytest.raises(ConfigError, match="nowhere"):
        itda_jaccard(built[3], tmp_path / "nowhere")
