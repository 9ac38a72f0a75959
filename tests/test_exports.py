"""Exports load back: Neuronpedia's dataset layout read back equals the store, a delphi result folder exported and
imported into a fresh store gives the same explanations and scores, a delphi folder written the way delphi writes
it imports, parquet tables equal the store. CLI: export/import commands, apikey, serve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from api_support import API_KEY, api_env, http  # noqa: F401 (fixtures)
from autointerp import cli
from autointerp.exports import (export_delphi, export_neuronpedia, export_parquet, import_delphi, read_jsonl_gz)
from autointerp.store import open_store


def _llm_expls(store, pk):
    return {e["latent"]: e for e in store.explanations(pk, with_text=True) if e["explainer"] == "default"}


def test_neuronpedia_layout_round_trip(api_env, tmp_path):
    store, d, cache = api_env["store"], api_env["dictionary"], api_env["cache"]
    root = export_neuronpedia(store, d["id"], tmp_path, batch_size=512)
    assert root.parent.parent == tmp_path and root.parent.name == "smollm2" and root.name == "2-xss-mlp2"
    for sub in ("features", "explanations", "activations"):
        assert sorted(p.name for p in (root / sub).iterdir())[0] == "batch-0.jsonl.gz"
    feats = read_jsonl_gz(root / "features")
    assert len(list((root / "features").iterdir())) == 3  # 1536 latents in batches of 512
    assert [f["index"] for f in feats] == [str(i) for i in range(1536)]
    s = cache.stats
    for f in feats[:200]:
        i = int(f["index"])
        assert f["modelId"] == "smollm2" and f["layer"] == "2-xss-mlp2" and f["hookName"] == "mlp_neurons.2"
        assert f["maxActApprox"] == pytest.approx(float(s["act_max"][i]))
        assert f["frac_nonzero"] == pytest.approx(s["n_active"][i] / cache.n_tokens)
        assert sum(f["freq_hist_data_bar_heights"]) == int(s["n_active"][i])
    expl = read_jsonl_gz(root / "explanations")
    stored = store.explanations(d["id"], with_text=True)
    assert sorted((int(e["index"]), e["description"]) for e in expl) == sorted((e["latent"], e["text"]) for e in stored)
    assert {e["typeName"] for e in expl} == {"autointerp-default", "autointerp-token_frequency"}
    acts = read_jsonl_gz(root / "activations")
    i = api_env["explained"][5]
    mine = [a for a in acts if a["index"] == str(i)]
    rec = cache.record(i)
    top = [a for a in mine if a["binMin"] == -1]
    assert len(top) == min(20, len(rec.top))
    for a, want in zip(top, rec.top.acts):
        assert len(a["tokens"]) == len(a["values"]) == cache.ctx_len
        assert np.allclose(a["values"], want, atol=1e-3) and a["maxValue"] == pytest.approx(float(want.max()), abs=1e-3)
        assert a["values"][a["maxValueTokenIndex"]] == a["maxValue"]
    scores = read_jsonl_gz(root / "autointerp_scores")
    assert len(scores) == len(store.scores(e["id"] for e in stored))


def test_delphi_export_imports_back_into_a_fresh_store(api_env, tmp_path):
    store, d, cache = api_env["store"], api_env["dictionary"], api_env["cache"]
    out = export_delphi(store, d["id"], tmp_path / "run")
    # one explanation per latent: its newest LLM one (other tests' jobs may have explained more latents)
    chosen: dict[int, dict] = {}
    for e in store.explanations(d["id"], with_text=True):
        if e["explainer"] not in ("random", "token_frequency") and e["id"] > chosen.get(e["latent"], {"id": -1})["id"]:
            chosen[e["latent"]] = e
    files = sorted(p.name for p in (out / "explanations").iterdir())
    assert files == sorted(f"mlp_neurons.2_latent{i}.txt" for i in chosen)
    assert set(api_env["explained"]) <= set(chosen)
    assert sorted(p.name for p in (out / "scores").iterdir()) == ["detection", "fuzz"]
    i = api_env["explained"][2]
    recs = json.loads((out / "scores" / "detection" / f"mlp_neurons.2_latent{i}.txt").read_text())
    assert {"str_tokens", "activations", "distance", "activating", "prediction", "probability", "correct"} <= set(recs[0])
    pos = [r for r in recs if r["activating"]]
    assert pos and all(len(r["str_tokens"]) == cache.ctx_len and max(r["activations"]) > 0 for r in pos)
    assert all(max(r["activations"]) == 0 for r in recs if not r["activating"])
    # into a fresh store (this test's own SQLite), registered from the cache folder
    fresh = open_store()
    counts = import_delphi(fresh, out, str(cache.path), explainer_model="judge")
    n_scores = len(store.scores(e["id"] for e in chosen.values()))
    assert counts == {"explanations": len(chosen), "scores": n_scores}
    assert import_delphi(fresh, out, str(cache.path), explainer_model="judge") == counts  # again: nothing new
    nd = fresh.dictionary(str(cache.path))
    got = {e["latent"]: e for e in fresh.explanations(nd["id"])}
    assert len(fresh.explanations(nd["id"])) == len(chosen)
    assert {i: e["text"] for i, e in got.items()} == {i: e["text"] for i, e in chosen.items()}
    want = chosen
    # detection scores recomputed from the per-example records equal what was exported from
    for i in api_env["explained"][:6]:
        new = {s["scorer"]: s for s in fresh.scores([got[i]["id"]])}
        old = {s["scorer"]: s for s in store.scores([want[i]["id"]])}
        ex = old["detection"]["details"]["examples"]
        labels = [x["label"] for x in ex]
        preds = [x["pred"] for x in ex]
        assert new["detection"]["metrics"]["n"] == len(ex)
        acc = sum(int(a == b) for a, b in zip(labels, preds)) / len(ex)
        assert new["detection"]["metrics"]["accuracy"] == pytest.approx(acc)
        assert new["detection"]["value"] == new["detection"]["metrics"]["balanced_accuracy"]
        assert set(new) == {"detection", "fuzzing"}


def test_a_folder_written_as_delphi_writes_it_imports(api_env, tmp_path):
    """delphi's own layout: explanations/layers.N_latentI.txt holding a JSON string, scores/detection and
    scores/fuzz with its ClassifierOutput records, run_config.json naming the explainer model."""
    cache = api_env["cache"]
    run = tmp_path / "delphi-run"
    (run / "explanations").mkdir(parents=True)
    (run / "scores" / "detection").mkdir(parents=True)
    (run / "scores" / "fuzz").mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps({"explainer_model": "hugging-quants/Llama-70B-AWQ",
                                                     "hookpoints": ["mlp_neurons.2"]}))
    rng = np.random.default_rng(0)
    written: dict[tuple[int, str], list[dict]] = {}
    for i in (3, 5, 9):
        (run / "explanations" / f"mlp_neurons.2_latent{i}.txt").write_bytes(json.dumps(f"delphi says {i}").encode())
        for scorer in ("detection", "fuzz"):
            recs = [{"str_tokens": ["a", " b"], "activations": [0.0, 1.0], "distance": int(q),
                     "activating": bool(q >= 0), "prediction": bool(p), "probability": None, "correct": bool(p) == bool(q >= 0)}
                    for q, p in zip(rng.integers(-1, 3, 20).tolist(), rng.integers(0, 2, 20).tolist())]
            (run / "scores" / scorer / f"mlp_neurons.2_latent{i}.txt").write_text(json.dumps(recs))
            written[(i, "fuzzing" if scorer == "fuzz" else scorer)] = recs
    res = CliRunner().invoke(cli.app, ["import-delphi", str(run), "--dictionary", str(cache.path)])
    assert res.exit_code == 0, res.output
    assert "imported 3 explanations and 6 scores" in res.output
    store = open_store()
    d = store.dictionary(str(cache.path))
    ex = store.explanations(d["id"])
    assert sorted((e["latent"], e["text"], e["model"]) for e in ex) == [
        (i, f"delphi says {i}", "hugging-quants/Llama-70B-AWQ") for i in (3, 5, 9)]
    sc = store.scores(e["id"] for e in ex)
    assert sorted({s["scorer"] for s in sc}) == ["detection", "fuzzing"]
    # each stored score is what its records imply: recomputed here from (activating, prediction) by hand
    latent_of = {e["id"]: e["latent"] for e in ex}
    got = {(latent_of[s["explanation_id"]], s["scorer"]): s for s in sc}
    assert set(got) == set(written)
    for key, recs in written.items():
        y = [r["activating"] for r in recs]
        p = [r["prediction"] for r in recs]
        tp, tn = sum(a and b for a, b in zip(y, p)), sum(not a and not b for a, b in zip(y, p))
        fp, fn = sum(b and not a for a, b in zip(y, p)), sum(a and not b for a, b in zip(y, p))
        recall, specificity = tp / (tp + fn), tn / (tn + fp)
        m = got[key]["metrics"]
        assert m["n"] == 20 and m["n_failed"] == 0, key
        assert m["accuracy"] == pytest.approx((tp + tn) / 20), key
        assert m["recall"] == pytest.approx(recall) and m["precision"] == pytest.approx(tp / (tp + fp)), key
        assert m["balanced_accuracy"] == pytest.approx((recall + specificity) / 2), key
        assert got[key]["value"] == pytest.approx((recall + specificity) / 2), key  # the headline
        assert [x["label"] for x in got[key]["details"]["examples"]] == [int(v) for v in y]
    # imported results are searchable like ours
    from autointerp.search import keyword_search

    assert {h.latent for h in keyword_search(store, "delphi says")} == {3, 5, 9}
    # bad folders: one line
    res = CliRunner().invoke(cli.app, ["import-delphi", str(tmp_path), "--dictionary", str(cache.path)])
    assert res.exit_code == 2 and "explanations/ missing" in res.output
    (run / "scores" / "fuzz" / "mlp_neurons.2_latent3.txt").write_text("{broken")
    res = CliRunner().invoke(cli.app, ["import-delphi", str(run), "--dictionary", str(cache.path),
                                       "--explainer-model", "other"])
    assert res.exit_code == 2 and "not a delphi score file" in res.output


def test_parquet_dump_equals_the_store(api_env, tmp_path):
    import pyarrow.parquet as pq

    store, d = api_env["store"], api_env["dictionary"]
    out = export_parquet(store, d["id"], tmp_path / "pq")
    lat = pq.read_table(out / "latents.parquet").to_pydict()
    assert lat["latent"] == list(range(1536)) and len(lat["hist"]) == 1536
    s = api_env["cache"].stats
    assert np.allclose(lat["max_act"], s["act_max"])
    ex = pq.read_table(out / "explanations.parquet").to_pydict()
    stored = store.explanations(d["id"])
    assert sorted(zip(ex["explanation_id"], ex["text"])) == sorted((e["id"], e["text"]) for e in stored)
    sc = pq.read_table(out / "scores.parquet").to_pydict()
    want = store.scores(e["id"] for e in stored)
    assert sorted(zip(sc["score_id"], sc["value"])) == sorted((x["id"], x["value"]) for x in want)
    assert json.loads(sc["metrics"][0])["n"] == 20


def test_cli_exports_apikey_and_serve(api_env, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOINTERP_DATABASE_URL", api_env["url"])
    r = CliRunner()
    res = r.invoke(cli.app, ["export-neuronpedia", str(tmp_path / "np"), "-d", "xss-mlp2"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "np" / "smollm2" / "2-xss-mlp2" / "features" / "batch-0.jsonl.gz").is_file()
    res = r.invoke(cli.app, ["export-delphi", str(tmp_path / "dl"), "-d", "xss-mlp2"])
    assert res.exit_code == 0 and (tmp_path / "dl" / "explanations").is_dir()
    res = r.invoke(cli.app, ["export-parquet", str(tmp_path / "pq"), "-d", "xss-mlp2"])
    assert res.exit_code == 0 and (tmp_path / "pq" / "scores.parquet").is_file()
    res = r.invoke(cli.app, ["export-parquet", str(tmp_path / "pq"), "-d", "nope"])
    assert res.exit_code == 2 and "unknown dictionary" in res.output
    # the existing JSON-lines export is unchanged
    res = r.invoke(cli.app, ["export", str(tmp_path / "rows.jsonl"), "--dictionary", "xss-mlp2"])
    assert res.exit_code == 0 and "wrote" in res.output
    # apikey: printed once, stored hashed, works against the server
    res = r.invoke(cli.app, ["apikey", "create", "cli-test"])
    assert res.exit_code == 0
    key = res.stdout.strip().splitlines()[0]
    assert key.startswith("ai_") and len(key) > 30
    listing = r.invoke(cli.app, ["apikey", "list"]).output
    assert "cli-test" in listing and key not in listing
    env = {**os.environ, "AUTOINTERP_DATABASE_URL": api_env["url"], "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "autointerp.cli", "serve", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("autointerp serving http://127.0.0.1:"), line
        url = line.split()[2]
        deadline = time.monotonic() + 30
        while True:
            try:
                if http("GET", url + "/api/v1/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        body = {"dictionary": "xss-mlp2", "text": "x" * 3000}
        assert http("POST", url + "/api/v1/activations", body, {"X-API-Key": key})[0] == 422  # key accepted
        assert http("POST", url + "/api/v1/activations", body, {"X-API-Key": API_KEY + "x"})[0] == 401
        kid = [l.split()[0] for l in listing.splitlines() if "cli-test" in l][0]
        assert r.invoke(cli.app, ["apikey", "revoke", kid]).exit_code == 0
        assert "revoked" in r.invoke(cli.app, ["apikey", "list"]).output
        s, _, page = http("GET", url + "/")
        assert s == 200 and b"xss-mlp2" in page
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    res = r.invoke(cli.app, ["apikey", "revoke", "99999"])
    assert res.exit_code == 2
