"""What makes the demo's second run fast: a stored comparison is reused while it is current (its extraction and jobs
are found by their identity in the store: tests/test_extraction_jobs.py). The demo itself trains two SAEs: too slow
for the test suite; the end-to-end and extraction-job tests cover the same stages on tiny configurations."""

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
