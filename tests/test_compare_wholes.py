"""Whole-dictionary comparisons beside the latent matching: the canonical-units split of a wider dictionary's
latents (novel vs reconstruction), and weight-only comparisons straight from checkpoints (nothing extracted)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from autointerp.compare import canonical_split, compare_checkpoints
from dict_fixtures import write_sparsify


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_canonical_split_tells_reconstruction_from_novel_latents():
    r = np.random.default_rng(0)
    small = _unit(r.normal(size=(8, 64)))
    # the wider dictionary: every small latent split in two near copies, plus 6 unrelated directions
    copies = _unit(np.repeat(small, 2, axis=0) + 0.2 * r.normal(size=(16, 64)) / 8)
    large = np.concatenate([copies, _unit(r.normal(size=(6, 64)))])
    got = canonical_split(small, large, threshold=0.7, cells=40)  # tiny blocks: the blockwise path
    assert got["reconstruction"] == list(range(16)) and got["novel"] == list(range(16, 22))
    assert got["partner"][:16] == [i // 2 for i in range(16)]  # many-to-one: a split latent has one partner
    assert got["novel_fraction"] == pytest.approx(6 / 22)
    brute = (large @ small.T).max(1)
    assert sum(got["max_cosine"]["counts"]) == 22 and ((brute >= 0.7) == np.isin(np.arange(22), got["reconstruction"])).all()


def test_checkpoints_compare_by_weights_without_an_extraction(tmp_path):
    write_sparsify(tmp_path / "a", d_in=16, n=24, k=4, seed=1)
    write_sparsify(tmp_path / "b", d_in=16, n=40, k=4, seed=2)
    # B re-learns A's first 20 decoder rows and has 20 of its own
    wa, wb = load_file(str(tmp_path / "a" / "sae.safetensors")), load_file(str(tmp_path / "b" / "sae.safetensors"))
    wb["W_dec"][:20] = wa["W_dec"][:20] * 1.5
    save_file(wb, str(tmp_path / "b" / "sae.safetensors"))
    r = compare_checkpoints(str(tmp_path / "a"), str(tmp_path / "b"), "decoder")
    s = r["summary"]
    assert s["wider"] == "b" and r["result"]["canonical"]["reconstruction"][:20] == list(range(20))
    assert s["reconstruction_latents"] >= 20 and s["novel_latents"] == 40 - s["reconstruction_latents"]
    assert sum(x == y for x, y, _ in r["result"]["decoder"]["pairs"]) >= 20  # the matching finds the copies

    from autointerp.cli import app

    out = CliRunner().invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--method", "decoder",
                                   "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["summary"]["novel_latents"] == s["novel_latents"]
    from autointerp.store import open_store
    from autointerp.store.tables import Comparison
    from sqlalchemy import func, select

    with open_store().tx() as conn:  # weights-only comparisons of checkpoints are not stored
        assert conn.execute(select(func.count()).select_from(Comparison.__table__)).scalar_one() == 0
