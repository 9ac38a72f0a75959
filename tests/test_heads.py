"""Attention-output dictionaries (attn_z): each latent's decoder-norm share per head, stored, served, filterable."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dict_fixtures import write_saelens


def test_hook_z_latents_live_in_their_planted_heads(subject, tmp_path):
    from api_support import ApiServer, http
    from autointerp.extract import extract
    from autointerp.heads import n_heads_of
    from autointerp.store import Store
    from autointerp.store import queries as Q

    n_heads = n_heads_of(subject.model)
    width = subject.width("attn_z.2")
    d_head, n = width // n_heads, 2 * n_heads
    folder = tmp_path / "z"
    write_saelens(folder, d_in=width, d_sae=n, hook_name="blocks.2.attn.hook_z")
    w = load_file(str(folder / "sae_weights.safetensors"))
    dec = torch.zeros(n, width)
    for i in range(n):  # latent i writes only into head i mod n_heads
        h = i % n_heads
        dec[i, h * d_head:(h + 1) * d_head] = torch.randn(d_head)
    save_file({**w, "W_dec": dec.contiguous()}, str(folder / "sae_weights.safetensors"))

    (cache,) = extract(subject, str(folder), None, "builtin", tmp_path / "c", n_tokens=512, ctx_len=32,
                       batch_size=8, top_k=4, n_sample=4, pool_size=8, progress=False)
    assert cache.manifest["hookpoint"] == "attn_z.2" and cache.manifest["n_heads"] == n_heads
    shares = np.load(cache.path / "head_share.npy").astype(np.float32)
    want = np.zeros((n, n_heads), np.float32)
    want[np.arange(n), np.arange(n) % n_heads] = 1.0
    np.testing.assert_allclose(shares, want, atol=1e-3)

    store = Store()
    d = store.register_cache(cache, name="z2")
    assert store.latent(d["id"], 5)["top_head"] == 5 % n_heads
    assert store.latent(d["id"], 5)["heads"][5 % n_heads] == 1.0
    rows, _ = Q.list_latents(store, d["id"], f=Q.LatentFilter(head=3), limit=50)
    assert [r["index"] for r in rows] == [3, 3 + n_heads]
    with ApiServer(store=store) as api:
        _, _, got = http("GET", f"{api.url}/api/v1/dictionaries/z2/latents/{n_heads + 4}")
        assert got["top_head"] == 4 and got["heads"][4] == 1.0 and sum(got["heads"]) == 1.0
        _, _, page = http("GET", f"{api.url}/api/v1/dictionaries/z2/latents?head=4")
        assert [r["index"] for r in page["items"]] == [4, 4 + n_heads]
        _, _, html = http("GET", f"{api.url}/d/z2/4")
        assert b"Attention heads" in html and b"most in head 4" in html


def test_other_hookpoints_have_no_head_shares(small_cache):
    assert not (small_cache.path / "head_share.npy").exists()
