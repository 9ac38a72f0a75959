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
from autointerp.collector import Collector, CollectorConfig, SparseCodes, planned_bytes
from autointerp.corpus import CorpusSpec, iter_windows
from autointerp.dictionaries import LinearDictionary
from autointerp.errors import ConfigError
from autointerp.extract import Plan, Target, encode_for_collector, extract, plan_extraction


def _sae(n: int, d: int, k: int, activation: str = "relu_topk") -> LinearDictionary:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, d, generator=g)
    # jumprelu: a threshold of 2.5 × sqrt(d): about a fifth of the codes fire at resid_post.1, under the plan's bound
    threshold = 2.5 * torch.ones(n) * d**0.5 if activation == "jumprelu" else None
    return LinearDictionary(format="sparsify", source="t", id="t", hookpoint=None, transcoder=False, W_enc=w,
                            b_enc=torch.zeros(n), W_dec=w.clone(), b_dec=torch.zeros(d), activation=activation, k=k,
                            threshold=threshold, subtract_b_dec=True)


def _meta_sae(n: int, d: int, activation: str, dtype=torch.float32, k: int | None = None) -> LinearDictionary:
    """A dictionary of n latents whose weights are never allocated (meta tensors): what the plan reads of it is
    its size, rule and dtype."""
    m = lambda *shape: torch.empty(*shape, device="meta", dtype=dtype)  # noqa: E731
    return LinearDictionary(format="saelens", source="t", id="t", hookpoint=None, transcoder=False, W_enc=m(d, n).T,
                            b_enc=m(n), W_dec=m(n, d), b_dec=m(d), activation=activation, k=k,
                            threshold=m(n) if activation == "jumprelu" else None, subtract_b_dec=True)


def _tensor_bytes(coll: Collector) -> int:
    bufs = [getattr(b, a) for b in (coll.top, coll.sample) for a in ("keys", "ids", "wmax", "off", "cnt", "pos", "q")]
    return sum(t.nbytes for t in bufs + [coll.n_active, coll.act_sum, coll.act_max, coll.hist])


@pytest.mark.parametrize("activation", ["relu_topk", "jumprelu"])
def test_collector_memory_stays_within_the_plan(subject, tmp_path, monkeypatch, activation):
    """What the collector holds after a run (arenas at their capacity included) is within the planned bound; the
    jumprelu codes come in latent chunks (a small chunk budget makes several)."""
    monkeypatch.setattr(base, "ENCODE_CHUNK_BYTES", 8 * 32 * 4 * 512)
    sae = _sae(2048, 576, 16 if activation == "relu_topk" else None, activation)
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


def test_plan_of_a_million_latent_jumprelu_matches_topk_and_bf16_costs_less(subject, tmp_path):
    """Issue 17: a 1,048,576-latent JumpReLU at d_in 576 planned 109 GiB at the defaults (every code of every
    window assumed kept, the batch's codes dense). Now its collector and batch plan close to the same width as TopK,
    a run of 8,192 tokens (128 windows) plans less than one of 100k, and a bf16 encode plans less than fp32."""
    n, d, cfg = 1 << 20, 576, CollectorConfig()

    def plan(dictionary, n_tokens=8192):
        p = plan_extraction(subject, [Target(dictionary, "resid_post.15", tmp_path)], cfg, n_tokens // 64, 64, 32)
        return (p.collector + p.batch) / 2**30

    jump, topk = plan(_meta_sae(n, d, "jumprelu")), plan(_meta_sae(n, d, "topk_relu", k=32))
    assert jump < 5.5 and jump < topk + 1.0, (jump, topk)
    assert plan(_meta_sae(n, d, "jumprelu", torch.bfloat16)) < jump - 0.25
    assert jump < plan(_meta_sae(n, d, "jumprelu"), 100_000) < 9


def test_kept_windows_and_entries_are_bounded_by_what_the_run_sees():
    """8,192 tokens of ctx 1024 are 8 windows: no latent keeps more, whatever K and S; and no more entries than
    the codes that fire."""
    cfg = CollectorConfig()
    few = planned_bytes(1000, 1024, cfg, 1000, 8192, 8)
    assert few["kept"] == 1000 * (8 + 8) and few["live"] == 2 * 1000 * 8192
    sparse = planned_bytes(1000, 64, cfg, 4, 8192, 8)
    assert sparse["kept"] == 2 * 4 * 8192 and sparse["live"] == 2 * 4 * 8192


def test_a_mapped_checkpoint_plans_its_encoder_weights_before_they_are_read(tmp_path):
    """An fp32 safetensors checkpoint is mapped, not read: the process's resident size misses its encoder until
    the first encode; the plan counts those bytes (and not the decoder, which extraction never reads). Loaded in
    bf16, the encoder is a converted copy (resident, half the bytes) and the decoder is converted when first read,
    to the same values as converting it at load."""
    from dict_fixtures import write_saelens

    from autointerp.dictionaries import load_dictionary

    write_saelens(tmp_path / "sae", arch="jumprelu", d_in=64, d_sae=8192)  # W_enc and W_dec 2 MiB each
    d = load_dictionary(str(tmp_path / "sae"), dtype=torch.float32)
    assert 1 << 20 < d.unloaded_bytes() <= 2 << 20
    d.encode(torch.randn(3, 64))
    assert d.unloaded_bytes() == 0
    bf = load_dictionary(str(tmp_path / "sae"), dtype=torch.bfloat16)
    assert bf.unloaded_bytes() == 0 and bf.encoder_weight().dtype == torch.bfloat16
    assert torch.equal(bf.encoder_weight(), d.encoder_weight().to(torch.bfloat16))
    assert torch.equal(bf.decoder_directions(), d.decoder_directions().to(torch.bfloat16))
