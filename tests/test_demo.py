"""What makes the demo's second run fast: finished caches are reused without loading the subject model, and a
stored comparison is reused while it is current. (The demo itself trains two SAEs: too slow for the test suite; the
end-to-end test covers the same stages on a tiny configuration.)"""

from __future__ import annotations

import json
import shutil

from autointerp import demo
from autointerp.store import open_store


def _fake_trained(seed: int) -> None:
    folder = demo.demo_dictionary_path(seed) / demo.DEMO_HOOKPOINT
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text("{}")
    (folder / "sae.safetensors").write_bytes(b"")


def test_second_run_reuses_finished_caches_only_when_everything_matches(tmp_path, monkeypatch, small_cache):
    monkeypatch.setenv("AUTOINTERP_CACHE", str(tmp_path / "home"))
    out = tmp_path / "demo"
    out.mkdir()
    assert demo._reusable_caches(out, 60_000) is None  # nothing done yet
    _fake_trained(0)
    _fake_trained(1)
    state = {"want": demo._state_key(60_000), "caches": [str(small_cache.path), str(small_cache.path)]}
    demo._state_file(out).write_text(json.dumps(state))
    got = demo._reusable_caches(out, 60_000)
    assert got is not None and [c.path for c in got] == [small_cache.path] * 2
    assert demo._reusable_caches(out, 50_000) is None  # other settings: extract again
    (demo.demo_dictionary_path(1) / demo.DEMO_HOOKPOINT / "sae.safetensors").unlink()
    assert demo._reusable_caches(out, 60_000) is None  # an SAE is gone: train again
    (demo.demo_dictionary_path(1) / demo.DEMO_HOOKPOINT / "sae.safetensors").write_bytes(b"")
    demo._state_file(out).write_text(json.dumps({**state, "caches": [str(tmp_path / "gone"), str(small_cache.path)]}))
    assert demo._reusable_caches(out, 60_000) is None  # a cache is gone
    demo._state_file(out).write_text("{not json")
    assert demo._reusable_caches(out, 60_000) is None


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
