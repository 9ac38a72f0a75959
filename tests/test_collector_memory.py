"""Memory of extraction: the plan bounds what the collector really holds and refuses what does not fit; the top-k
encode never holds tokens × n_latents."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_extract import DICT, HOOK, SMALL

import autointerp.dictionaries.base as base
from autointerp.collector import Collector, CollectorConfig, SparseCodes
from autointerp.corpus import CorpusSpec, iter_windows
from autointerp.dictionaries import LinearDictionary
from autointerp.errors import ConfigError
from autointerp.extract import Plan, Target, encode_for_collector, extract, plan_extraction


def _sae(n: int, d: int, k: int) -> LinearDictionary:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, d, generator=g)
    return LinearDictionary(format="sparsify", source="t", id="t", hookpoint=None, transcoder=False, W_enc=w,
                            b_enc=torch.zeros(n), W_dec=w.clone(), b_dec=torch.zeros(d), activation="relu_topk", k=k,
                            subtract_b_dec=True)


def _tensor_bytes(coll: Collector) -> int:
    bufs = [getattr(b, a) for b in (coll.top, coll.sample) for a in ("keys", "ids", "wmax", "off", "cnt", "pos", "q")]
    return sum(t.nbytes for t in bufs + [coll.n_active, coll.act_sum, coll.act_max, coll.hist])


def test_collector_memory_stays_within_the_plan(subject, tmp_path):
    """What the collector holds after a run (arenas at their capacity included) is within the planned bound."""
    sae = _sae(2048, 576, 16)
    cfg = CollectorConfig(top_k=SMALL["top_k"], n_sample=SMALL["n_sample"], pool_size=SMALL["pool_size"])
    coll = Collector(2048, 32, cfg, "cpu")
    hook = subject.hookpoint("resid_post.1")
    wid = 0
    for batch in iter_windows(CorpusSpec(source="builtin", ctx_len=32, n_tokens=4096), subject.tokenizer, 8):
        ids = torch.from_numpy(batch).long()
        x = subject.capture(ids, [hook])[hook.name]
        coll.update(encode_for_collector(sae, x, torch.zeros(ids.shape, dtype=torch.bool)), torch.arange(wid, wid + 8))
        wid += 8
    plan = plan_extraction(subject, [Target(sae, "resid_post.1", tmp_path)], cfg, wid, 32, 8)
    assert coll.top.live > 0 and _tensor_bytes(coll) <= plan.collector
    assert plan.peak == plan.loaded + plan.collector + plan.batch
    assert "plan: peak memory <=" in plan.describe()


def test_a_plan_over_the_memory_is_refused_before_anything_is_written(subject, tmp_path):
    with pytest.raises(ConfigError, match=r"planned peak memory .* exceeds the 0.1 GiB --max-memory available .*: "
                                          r"lower --"):
        extract(subject, DICT, HOOK, "builtin", tmp_path / "x", max_memory=0.1, **SMALL)
    assert not (tmp_path / "x").exists()
    (cache,) = extract(subject, DICT, HOOK, "builtin", tmp_path / "ok", max_memory=64, **SMALL)
    assert cache.n_tokens == SMALL["n_tokens"]


def test_refusal_names_the_flag_that_fixes_it():
    """Big K × S on many latents: the collector dominates and --top-k/--n-sample is named; a big batch: --batch-size."""
    coll = Plan(loaded=1 << 30, collector=40 << 30, batch=1 << 30, budget=20 << 30, device="cpu", disk_cache=0,
                disk_running=0)
    with pytest.raises(ConfigError, match=r"lower --top-k/--n-sample \(50/100\)$"):
        coll.check(50, 100, 32, None)
    batch = Plan(loaded=1 << 30, collector=1 << 30, batch=40 << 30, budget=20 << 30, device="cpu", disk_cache=0,
                 disk_running=0)
    with pytest.raises(ConfigError, match=r"this machine has available .*lower --batch-size \(32\)$"):
        batch.check(50, 100, 32, None)


def test_cli_memory_refusal_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "autointerp.cli", "extract", "--dictionary", DICT, "--hookpoint", HOOK,
                        "--n-tokens", "512", "--max-memory", "0.1", "--out", str(tmp_path / "x"), "--no-progress"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: planned peak memory") and "--max-memory" in lines[-1], r.stderr
    assert not (tmp_path / "x").exists()


def test_chunked_top_k_encode_never_holds_tokens_by_latents(monkeypatch):
    """With a small chunk budget the pre-activations come 16 rows at a time, and the codes equal the one-shot ones."""
    sae = _sae(512, 24, 4)
    x = torch.randn(3, 40, 24)
    whole = sae.encode_topk(x)
    shapes = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(base.F, "linear", lambda *a: shapes.append(tuple(linear(*a).shape)) or linear(*a))
    monkeypatch.setattr(base, "ENCODE_CHUNK_BYTES", 16 * 4 * 512)
    vals, idx = sae.encode_topk(x)
    assert shapes and max(s[0] for s in shapes) == 16 and len(shapes) == 8
    dense = lambda v, i: torch.zeros(3, 40, 512).scatter_(-1, i, v)  # noqa: E731
    torch.testing.assert_close(dense(vals, idx), dense(*whole))


def test_checkpoint_holds_filled_slots_only_and_resumes_exactly():
    """Few windows over many latents: the state is the filled slots and live entries, not n × (K + S) slots, and a
    collector loaded from it goes on exactly like the one that made it."""
    n, T = 50_000, 16
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(4, T, 8, generator=g), torch.randint(0, n, (4, T, 8), generator=g)) for _ in range(4)]
    a = Collector(n, T, CollectorConfig(), "cpu")
    for i, (v, ix) in enumerate(batches[:2]):
        a.update(SparseCodes(v, ix, n), torch.arange(4 * i, 4 * i + 4))
    st = a.state()
    saved = sum(t.nbytes for buf in ("top", "sample") for t in st[buf].values())
    assert saved < _tensor_bytes(a) / 100
    b = Collector(n, T, CollectorConfig(), "cpu")
    b.load_state(st)
    for i, (v, ix) in enumerate(batches[2:], start=2):
        for c in (a, b):
            c.update(SparseCodes(v, ix, n), torch.arange(4 * i, 4 * i + 4))
    for buf in ("top", "sample"):
        for got, want in zip(getattr(b, buf).export(), getattr(a, buf).export()):
            for x, y in zip(got, want):
                assert (x == y).all()
