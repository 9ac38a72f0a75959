"""What the CLI prints, built by the modules that own it (issue 19: cli.py holds commands only): a cache's summary
(cache.summary_text), a quality block (quality.quality_text), a job run's result (JobSummary.text) and the demo's
summary (demo.demo_summary_text); and latent selection and scorer options beside the job spec that uses them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import autointerp.jobs as jobs
import autointerp.jobs.export as job_export
from autointerp.errors import ConfigError
from autointerp.llm.base import Usage

QUALITY = {"n_windows": 4, "spliced_at": "model.layers.2.mlp:output", "fvu": 0.125, "l0": 3.0,
           "loss_recovered": 0.875, "n_tokens": 100, "l0_hist": {"edges": [0, 4, 8, 12], "counts": [2, 0, 4]}}


def test_quality_text_lists_the_shown_rows_in_order_then_the_l0_histogram():
    from autointerp.quality import quality_text

    assert quality_text(None) == "" and quality_text({}) == ""
    assert quality_text({"error": "CUDA out of memory"}) == "quality pass failed: CUDA out of memory"
    assert quality_text(QUALITY).splitlines() == [
        "quality (first 4 windows, spliced at model.layers.2.mlp:output):",
        f"  {'L0 (latents per token)':<34} 3.0000",
        f"  {'FVU':<34} 0.1250",
        f"  {'loss recovered':<34} 0.8750",
        f"  {'tokens evaluated':<34} 100",
        "  L0      0..3            2 " + "#" * 15,  # the empty bin 4..7 is left out; the peak bin has 30 marks
        "  L0      8..11           4 " + "#" * 30,
    ]


class _Top:
    def __init__(self):
        self.acts, self.tokens = np.array([[0.0, 3.0, 1.0]]), np.array([[7, 8, 9]])

    def __len__(self):
        return len(self.acts)


class _Cache:
    """What summary_text reads of a LatentCache: 4 latents over 100 tokens, latents 1 and 2 alive."""
    path, n_latents, n_tokens = Path("/runs/c"), 4, 100
    stats = {"n_active": np.array([0, 10, 5, 0]), "act_max": np.array([0.0, 2.5, 1.25, 0.0])}

    def __init__(self, quality=None):
        self.manifest = {"hookpoint": "mlp_neurons.2", "quality": quality}
        self.tokenizer = None

    def alive_latents(self):
        return np.flatnonzero(self.stats["n_active"] > 0)

    def disk_bytes(self):
        return 2_500_000

    def attach_tokenizer(self, tokenizer):
        self.tokenizer = tokenizer

    def record(self, i):
        words = {7: " the", 8: " cat\n", 9: " sat"}
        return SimpleNamespace(top=_Top(), stats=SimpleNamespace(mean_act=0.5 * i),
                               token_strings=lambda toks: [words[int(t)] for t in toks])


def test_summary_text_of_a_cache():
    from autointerp.cache import summary_text

    c = _Cache()
    lines = summary_text(c, n_show=1, tokenizer="tok").split("\n")
    assert c.tokenizer == "tok"  # the top contexts are decoded with the given tokenizer
    assert lines == [
        "",  # a blank line before each cache (extract prints one summary per dictionary)
        "/runs/c: 4 latents, 100 tokens, hookpoint mlp_neurons.2, 2 alive (50.0%), 2.5 MB on disk",
        "firing frequency of alive latents: median 7.50e-02, max 1.00e-01",
        " latent      freq      max     mean  top context",
        "      1  1.00e-01     2.50     0.50   the<< cat⏎>> sat",  # n_show=1: latent 2 is not listed
    ]
    full = summary_text(_Cache(QUALITY))
    assert "quality (first 4 windows, spliced at model.layers.2.mlp:output):" in full
    assert full.index("firing frequency") < full.index("quality (first") < full.index(" latent      freq")
    assert full.splitlines()[-1].startswith("      2  5.00e-02     1.25     1.00")


def test_job_summary_text_is_the_score_table_then_one_line(monkeypatch):
    from autointerp.jobs import JobSummary

    asked = []
    rows = [{"type": "explanation", "latent": 3},
            {"type": "score", "scorer": "detection", "metrics": {"balanced_accuracy": 0.75}, "skipped": False},
            {"type": "score", "scorer": "detection", "metrics": {}, "skipped": True}]
    monkeypatch.setattr(job_export, "export_rows", lambda store, job_id=None: asked.append(job_id) or iter(rows))
    s = JobSummary(7, "done", latents_done=1, latents_skipped=1,
                   usage=Usage(prompt_tokens=100, completion_tokens=20, cost_usd=0.0123, calls=3, cached_calls=1))
    table, line = s.text("STORE", Path("out.jsonl")).split("\n\n")
    assert asked == [7]
    assert table.splitlines()[2].split() == ["detection", "balanced_accuracy", "1", "0.750", "0.750", "0.750",
                                             "0.750"]
    assert table.splitlines()[3].split() == ["detection", "(skipped/failed)", "1", "failed", "examples:", "0"]
    assert line == ("job 7: 1 latents done, 0 already done, 1 skipped, 0 failed; LLM: 3 calls (1 cached), 100 prompt "
                    "+ 20 completion tokens, $0.0123; status done; results in the store ('STORE') and out.jsonl")
    assert s.text("STORE").endswith("results in the store ('STORE')")


def test_demo_summary_text(monkeypatch):
    from autointerp.demo import demo_summary_text

    rows = {1: [{"type": "explanation", "explanation_id": 11, "text": "the word cat"},
                {"type": "score", "scorer": "detection", "skipped": False, "latent": 3, "explanation_id": 11,
                 "metrics": {"balanced_accuracy": 0.8}},
                {"type": "score", "scorer": "embedding", "skipped": False, "latent": 3, "explanation_id": 11,
                 "metrics": {"auc": 0.6}}],
            2: [{"type": "score", "scorer": "detection", "skipped": False, "latent": 3, "explanation_id": 12,
                 "metrics": {"balanced_accuracy": 0.5}}]}
    monkeypatch.setattr(job_export, "export_rows", lambda store, job_id=None: iter(rows[job_id]))
    monkeypatch.setattr(jobs, "status", lambda store, j: SimpleNamespace(
        spend={"calls": j, "prompt_tokens": 10 * j, "completion_tokens": j, "cost_usd": 0.5 * j}))
    r = {"store": "S", "jobs": {"default": 1, "random": 2}, "embedded": 5, "plot": "p.png",
         "comparison": {"decoder": ({"shared_fraction": 0.5}, 3),
                        "embedding": ({"matched_fraction_a": 0.25, "explained_a": 8}, 4)}}
    lines = demo_summary_text(r).split("\n")
    assert lines[0].split() == ["scorer", "metric", "default", "random", "(mean", "over", "latents;", "n)"]
    assert lines[1].split() == ["detection", "balanced_accuracy", "0.800", "(", "1)", "0.500", "(", "1)"]
    assert lines[2].split() == ["fuzzing", "balanced_accuracy", "-", "-"]
    assert lines[3].split() == ["embedding", "auc", "0.600", "(", "1)", "-"]
    assert lines[4].startswith("(a 135M explainer and judge are weak")
    assert "      3   0.800  the word cat" in lines
    assert "LLM usage: 3 calls, 30 prompt + 3 completion tokens, $1.5000" in lines
    assert lines[-4].startswith("demo vs demo-seed1 by decoder/encoder cosine: 50.0% of latents shared")
    assert lines[-3].startswith("demo vs demo-seed1 by explanation meaning: 25.0% of 8 explained latents matched")
    assert lines[-2:] == ['5 explanations embedded for search (try: autointerp search "numbers")', "plot: p.png"]


def test_latent_selection_and_scorer_options_live_beside_the_job_spec():
    from autointerp.jobs import JobSpec
    from autointerp.jobs.scoring import check_scorer_options, scorer_config_for_key
    from autointerp.jobs.selection import parse_latents

    assert parse_latents("3-5,1,3", range(10), 10) == [3, 4, 5, 1]
    assert parse_latents(None, [2, 4, 6], 10, n=2) == [2, 4]
    with pytest.raises(ConfigError, match="range '5-3' is reversed"):
        parse_latents("5-3", range(10), 10)
    assert check_scorer_options(["detection"], {"detection": {"batch_size": 5}}) == {"detection": {"batch_size": 5}}
    with pytest.raises(ConfigError, match="not among the scorers"):
        check_scorer_options(["detection"], {"fuzzing": {"batch_size": 5}})
    spec = JobSpec(dictionary="d", scorers=["detection"], scorer_options={"detection": {"batch_size": 5}})
    assert scorer_config_for_key("detection", spec).batch_size == 5
