"""The small TopK SAE trainer: learns a known sparse dictionary, is deterministic, round-trips through the loader."""

from __future__ import annotations

import pytest
import torch

from autointerp.dictionaries import load_dictionary
from autointerp.errors import ConfigError
from autointerp.train_sae import train_topk_sae
from needs import SPARSIFY, has_module, need

FAST = dict(steps=300, lr=3e-3, batch_size=256, num_threads=1)


def synthetic(n=4096, d=32, atoms=64, active=4, seed=0):
    """x = sparse non-negative combination of `active` of `atoms` unit directions, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(atoms, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    idx = torch.rand(n, atoms, generator=g).argsort(-1)[:, :active]
    codes = torch.zeros(n, atoms).scatter_(1, idx, torch.rand(n, active, generator=g) + 0.5)
    return codes @ D + 0.3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    x = synthetic()
    out = tmp_path_factory.mktemp("sae")
    return x, train_topk_sae(x, 128, 8, out_dir=out, hookpoint="layers.3", seed=0, **FAST)


def test_learns_sparse_dictionary(trained):
    _, r = trained
    assert r.fvu < 0.3, r
    assert r.dead_fraction < 0.5 and r.steps == 300


def test_round_trip_through_loader(trained):
    x, r = trained
    d = load_dictionary(r.path)
    assert (d.format, d.hookpoint, d.transcoder, d.d_in, d.n_latents) == ("sparsify", "layers.3", False, 32, 128)
    with torch.no_grad():
        assert torch.equal(d.encode(x[:500]), r.model.encode(x[:500]))
    norms = d.decoder_directions().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(128), atol=1e-5, rtol=0)


def test_deterministic_with_seed(tmp_path):
    x = synthetic(n=1024)
    a = train_topk_sae(x, 64, 4, out_dir=tmp_path / "a", hookpoint="h", seed=3, steps=40, num_threads=1)
    b = train_topk_sae(x, 64, 4, out_dir=tmp_path / "b", hookpoint="h", seed=3, steps=40, num_threads=1)
    c = train_topk_sae(x, 64, 4, out_dir=tmp_path / "c", hookpoint="h", seed=4, steps=40, num_threads=1)
    read = lambda r: (r.path / "sae.safetensors").read_bytes()  # noqa: E731
    assert read(a) == read(b) and read(a) != read(c)
    assert a.fvu == b.fvu


def test_transcoder(tmp_path):
    x = synthetic(n=2048)
    M = torch.randn(32, 24, generator=torch.Generator().manual_seed(5)) / 6
    y = torch.relu(x) @ M + 1.0
    r = train_topk_sae(x, 96, 8, targets=y, transcode=True, out_dir=tmp_path, hookpoint="layers.1.mlp", **FAST)
    d = load_dictionary(tmp_path / "layers.1.mlp")
    assert d.transcoder and (d.d_in, d.d_out, d.n_latents) == (32, 24, 96)
    assert torch.equal(d.encode(x[:200]), r.model.encode(x[:200]))
    assert r.fvu < 0.5, r


def test_bad_arguments(tmp_path):
    x = synthetic(n=64)
    for kwargs, match in [
        (dict(transcode=True), "transcode=True needs targets"),
        (dict(n_latents=4, k=8), "need 1 <= k <= n_latents"),
        (dict(hookpoint="a/b"), "must be a plain folder name"),
        (dict(acts=x[0]), r"acts must be a float tensor \[N, d_in\]"),
    ]:
        args = dict(acts=x, n_latents=16, k=2, out_dir=tmp_path, hookpoint="h", steps=1) | kwargs
        with pytest.raises(ConfigError, match=match):
            train_topk_sae(**args)


def test_loadable_by_eleutherai_sparsify(trained):
    need(has_module("sparsify"), SPARSIFY)
    from sparsify import sparse_coder
    x, r = trained
    ref = sparse_coder.SparseCoder.load_from_disk(r.path)
    with torch.no_grad():
        acts, idx, _ = ref.encode(x[:100])
    expected = torch.zeros(100, 128).scatter_(-1, idx, acts)
    torch.testing.assert_close(load_dictionary(r.path).encode(x[:100]), expected)


def test_side_by_side_training_equals_one_thread_runs_and_raises_failures(tmp_path):
    """The demo trains its two seeds at once, one torch thread each: each result must be the SAE a single-threaded
    run of that seed gives (so the cached demo dictionaries do not depend on how they were trained), torch's thread
    count is restored, and a failing training is raised, not lost in its thread."""
    from autointerp.demo import train_side_by_side

    x = torch.randn(3000, 24, generator=torch.Generator().manual_seed(5))
    kw = dict(n_latents=48, k=4, hookpoint="h", steps=60, lr=3e-3)
    threads = torch.get_num_threads()
    both = train_side_by_side(x, [0, 1], [tmp_path / "a", tmp_path / "b"], **kw)
    assert torch.get_num_threads() == threads
    for sd, got in zip((0, 1), both):
        alone = train_topk_sae(x, out_dir=tmp_path / f"alone{sd}", seed=sd, num_threads=1, **kw)
        assert torch.equal(got.model.W_dec, alone.model.W_dec) and got.fvu == alone.fvu
    assert not torch.equal(both[0].model.W_dec, both[1].model.W_dec)
    with pytest.raises(ConfigError, match="plain folder name"):
        train_side_by_side(x, [0, 1], [tmp_path / "c", tmp_path / "d"], **{**kw, "hookpoint": "a/b"})
    assert torch.get_num_threads() == threads
