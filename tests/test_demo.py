"""What makes the demo's second run fast: a stored comparison is reused while it is current (its extraction and jobs
are found by their identity in the store: tests/test_extraction_jobs.py), and its first run copies the shipped SAEs.
The whole demo is too slow for the test suite; the end-to-end and extraction-job tests cover the same stages on tiny
configurations."""

from __future__ import annotations

import json
import shutil

from autointerp import demo
from autointerp.store import open_store


def test_a_stored_comparison_is_reused_until_an_explanation_is_newer(small_cache, tmp_path):
    from autointerp.cache import LatentCache
    from autointerp.jobs import run, submit

    copy = tmp_path / "copy"  # the same neurons under another dictionary id: a second dictionary of the store
    shutil.copytree(small_cache.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["dictionary"]["id"] += "-copy"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    store = open_store()
    a, b = store.register_cache(small_cache, name="a"), store.register_cache(LatentCache(copy), name="b")
    assert a["id"] != b["id"]
    for d in ("a", "b"):
        run(store, submit(store, {"dictionary": d, "n_latents": 12, "explainer": "token_frequency", "scorers": [],
                                  "hard_negatives": False}), progress=False)
    first = demo.compare_demo(store, a, b)
    assert set(first) == {"decoder", "embedding"}
    assert first["decoder"][0]["shared_fraction"] == 1.0  # the same dictionary twice
    assert demo.compare_demo(store, a, b) == first  # nothing new: the stored rows, no new comparison
    run(store, submit(store, {"dictionary": "b", "n_latents": 16, "explainer": "token_frequency", "scorers": [],
                              "hard_negatives": False}), progress=False)
    again = demo.compare_demo(store, a, b)
    assert again["decoder"] == first["decoder"]  # directions did not change
    assert again["embedding"][1] != first["embedding"][1]  # newer explanations: compared again


def test_the_shipped_demo_saes_are_copied_not_trained(tmp_path, monkeypatch):
    """A first run copies the package's demo SAEs (made with today's DEMO settings, float16) instead of loading the
    subject model and training for minutes; a copy made with other settings is not used."""
    import torch
    from safetensors.torch import load_file

    from autointerp import subject
    from autointerp.dictionaries import load_dictionary

    monkeypatch.setenv("AUTOINTERP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(subject, "load_subject", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    path = demo.ensure_demo_dictionary(seeds=(0, 1))
    assert path == demo.demo_dictionary_path(0) / demo.DEMO_HOOKPOINT
    for sd in (0, 1):
        here = demo.demo_dictionary_path(sd) / demo.DEMO_HOOKPOINT
        shipped = demo.SHIPPED / f"seed{sd}" / demo.DEMO_HOOKPOINT
        assert (here / "sae.safetensors").read_bytes() == (shipped / "sae.safetensors").read_bytes()
        assert {t.dtype for t in load_file(str(here / "sae.safetensors")).values()} == {torch.float16}
        d = load_dictionary(here)
        assert (d.n_latents, d.d_in, d.hookpoint) == (demo.DEMO["n_latents"], 576, demo.DEMO_HOOKPOINT)
    assert not list((tmp_path / "cache" / "dictionaries").glob("*.partial"))
    # seeds 0 and 1 are different SAEs
    a, b = (load_file(str(demo.demo_dictionary_path(sd) / demo.DEMO_HOOKPOINT / "sae.safetensors")) for sd in (0, 1))
    assert not torch.equal(a["W_dec"], b["W_dec"])
    # made with other settings: not taken (the demo would train instead)
    monkeypatch.setitem(demo.DEMO, "steps", demo.DEMO["steps"] + 1)
    assert demo._shipped(0) is None
