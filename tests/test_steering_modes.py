"""Steering modes (issue 20, part 5) on the real SmolLM2 with small dictionaries built here: add, clamp, directional
ablation, several latents at once, the next-token loss of a corpus under an intervention, the intervention scorer's
clamp mode, and /steer and `autointerp steer` with modes and several latents. Every expectation is computed apart
from the code under test (codes from the dictionary's weights, losses from the model's own `labels=` loss)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from api_support import API_KEY, api_env, api_server, http  # noqa: F401 (fixtures)
from dict_fixtures import write_sparsify
from judges_sim import random_sentences, word_record

from autointerp.corpus import CorpusSpec, iter_windows
from autointerp.dictionaries import Poles
from autointerp.dictionaries.base import LinearDictionary
from autointerp.errors import ConfigError
from autointerp.scorers import intervention as iv
from autointerp.steering import Edit, corpus_loss, intervene, steer

torch.set_num_threads(1)  # shared CPU: 2 OpenMP threads competing with other processes are ~10x slower

HP = "resid_post.10"
TEXT = "The wedding was lovely: the bride, the groom and their dog walked by the river after the music stopped."
N = 16


def _tied(activation: str, k: int | None = None, hookpoint: str = HP, transcoder: bool = False) -> LinearDictionary:
    """Encoder rows = decoder rows = random unit vectors, no biases: latent j's pre-activation is x·d_j, so moving x
    along d_j by δ moves its pre-activation by exactly δ (the case in which clamp's edit re-encodes to the value)."""
    W = torch.nn.functional.normalize(torch.randn(N, 576, generator=torch.Generator().manual_seed(7)), dim=-1)
    return LinearDictionary(format="test", source="test", id=f"test:tied-{activation}", hookpoint=hookpoint,
                            transcoder=transcoder, W_enc=W, b_enc=torch.zeros(N), W_dec=W, b_dec=torch.zeros(576),
                            activation=activation, k=k)


@pytest.fixture(scope="module")
def ids(subject):
    return subject.tokenizer(TEXT, return_tensors="pt").input_ids


def _at(subject, ids, hp=HP) -> torch.Tensor:
    """The activations at the hookpoint ([T, d]), as the model's hooks leave them (inside an intervention: edited)."""
    return subject.capture(ids, [hp])[getattr(hp, "name", hp)][0].detach()


def _busiest(codes: torch.Tensor) -> int:
    return int(codes.clamp(min=0).sum(0).argmax())


def test_negative_add_lowers_the_latents_own_code(subject, ids):
    d = _tied("relu")
    x = _at(subject, ids)
    code = d.encode(x)
    j = _busiest(code)
    alpha = 0.5 * float(code[:, j].max())
    assert alpha > 0.5  # the latent fires on the text: there is something to lower
    with intervene(subject.model, HP, [Edit(j, "add", -alpha)], d):
        lowered = d.encode(_at(subject, ids))[:, j]
    # pre-activation x·d_j moves by exactly -alpha: relu(code - alpha) everywhere (0 stays 0)
    assert torch.allclose(lowered, (code[:, j] - alpha).clamp(min=0), atol=1e-4)
    assert lowered.sum() < code[:, j].sum() and ((lowered > 0) & (lowered < code[:, j])).any()
    # the scorer's and the API's units: strength × value × the median norm along the unit direction
    target = iv.SteeringTarget(subject.model, subject.tokenizer, HP, d)
    with target.intervention([Edit(j, "add", 1.0)], strength=-alpha / target.norm):
        via_target = d.encode(_at(subject, ids))[:, j]
    assert torch.allclose(via_target, lowered, atol=1e-4)


@pytest.mark.parametrize("kind", ["relu", "relu_topk", "abstopk poles"])
def test_clamp_to_zero_leaves_the_code_zero_at_the_hookpoint(subject, ids, kind):
    d = Poles(_tied("abstopk", k=4)) if kind == "abstopk poles" else _tied(kind, k=4 if "topk" in kind else None)
    x = _at(subject, ids)
    code = d.encode(x)
    if kind == "abstopk poles":  # the "-" pole of the latent most often negative: its unit is n + i
        i = _busiest(-d.base.encode(x))
        j = d.n_base + i
        assert d.base.encode(x)[:, i].min() < -0.5
    else:
        j = _busiest(code)
    assert code[:, j].max() > 0.5
    with intervene(subject.model, HP, [Edit(j, "clamp", 0.0)], d):
        y = _at(subject, ids)
    assert d.encode(y)[:, j].abs().max() < 1e-5
    if kind == "abstopk poles":  # the pole's latent is no longer negative anywhere
        assert d.base.encode(y)[:, i].min() > -1e-5
    # the edit is the formula x + (0 - code_j(x)) d_j (the "-" pole writes -d_i)
    write = d.decoder_directions()[j]
    assert torch.allclose(y, x - code[:, j:j + 1] * write, atol=1e-4)


def test_clamp_to_a_value_sets_the_code_where_the_latent_fires(subject, ids):
    d = _tied("relu")
    x = _at(subject, ids)
    code = d.encode(x)
    j = _busiest(code)
    with intervene(subject.model, HP, [Edit(j, "clamp", 3.0)], d):
        got = d.encode(_at(subject, ids))[:, j]
    fired = code[:, j] > 0
    assert fired.any() and (~fired).any()
    assert torch.allclose(got[fired], torch.full_like(got[fired], 3.0), atol=1e-4)
    # where it did not fire the pre-activation (<= 0) rises by 3
    assert torch.allclose(got[~fired], ((x @ d.decoder_directions()[j])[~fired] + 3.0).clamp(min=0), atol=1e-4)


def test_ablation_removes_the_component_along_the_direction(subject, ids):
    d = _tied("relu")
    x = _at(subject, ids)
    units = torch.nn.functional.normalize(d.decoder_directions(), dim=-1)
    norms = x.norm(dim=-1)
    j = int((x @ units.T).abs().sum(0).argmax())
    assert (x @ units[j]).abs().max() > 1.0  # a real component to remove
    with intervene(subject.model, HP, [Edit(j, "ablate")], d):
        y = _at(subject, ids)
    assert ((y @ units[j]).abs() / norms).max() < 1e-6
    assert torch.allclose(y, x - (x @ units[j])[:, None] * units[j], rtol=0, atol=1e-6 * float(norms.max()))
    # two directions that are not orthogonal: x ends orthogonal to both (one projection after the other would not)
    pair = [j, (j + 1) % N]
    assert abs(float(units[pair[0]] @ units[pair[1]])) > 1e-3
    with intervene(subject.model, HP, [Edit(pair[0], "ablate"), Edit(pair[1], "ablate")], d):
        y2 = _at(subject, ids)
    assert ((y2 @ units[pair].T).abs() / norms[:, None]).max() < 1e-6
    # both poles of a signed latent are one direction: ablating both is ablating one
    p = Poles(_tied("abstopk", k=4))
    with intervene(subject.model, HP, [Edit(j, "ablate"), Edit(N + j, "ablate")], p):
        y3 = _at(subject, ids)
    assert torch.allclose(y3, y, atol=1e-5)


def test_several_add_edits_equal_the_sum_of_the_single_ones(subject, ids):
    d = _tied("relu")
    x = _at(subject, ids)
    edits = [Edit(1, "add", 3.0), Edit(4, "add", -2.5), Edit(9, "add", 5.0)]

    def delta(es):
        with intervene(subject.model, HP, es, d):
            return _at(subject, ids) - x

    singles = sum(delta([e]) for e in edits)
    assert singles.norm(dim=-1).min() > 1.0
    assert torch.allclose(delta(edits), singles, rtol=0, atol=1e-5)
    # clamps read their codes from the unedited activations: they add up the same way
    code = d.encode(x)
    busy = code.sum(0).argsort(descending=True)[:2].tolist()
    clamps = [Edit(busy[0], "clamp", 0.0), Edit(busy[1], "clamp", 4.0)]
    assert torch.allclose(delta(clamps), sum(delta([e]) for e in clamps), rtol=0, atol=1e-5)
    # downstream too: one hook writing the summed vector, the same logits as steering along that sum
    with torch.no_grad(), intervene(subject.model, HP, edits, d):
        multi = subject.model(input_ids=ids).logits[0]
    vec = sum(e.value * d.decoder_directions()[e.latent] for e in edits)
    with torch.no_grad(), steer(subject.model, HP, vec, 1.0):
        summed = subject.model(input_ids=ids).logits[0]
    assert torch.allclose(multi, summed, atol=1e-4)


def test_edits_are_checked_and_hooks_removed(subject, ids):
    d = _tied("relu")
    with torch.no_grad():
        clean = subject.model(input_ids=ids).logits[0]
    for bad, match in (([Edit(N, "add", 1.0)], "out of range"), ([Edit(0, "erase", 1.0)], "mode 'erase'"),
                       ([Edit(2, "add", 1.0), Edit(2, "clamp", 0.0)], "edited twice"),
                       ([Edit(2, "add", float("nan"))], "finite")):
        with pytest.raises(ConfigError, match=match):
            with intervene(subject.model, HP, bad, d):
                pass
    with pytest.raises(ConfigError, match="clamp needs the dictionary's encoder"):
        with intervene(subject.model, HP, [Edit(0, "clamp", 0.0)], d.decoder_directions()):
            pass
    with intervene(subject.model, HP, [Edit(3, "add", 0.0)], d), torch.no_grad():
        assert torch.equal(subject.model(input_ids=ids).logits[0], clean)  # nothing to do: no hook at all
    with torch.no_grad():
        assert torch.equal(subject.model(input_ids=ids).logits[0], clean)  # every hook removed


def test_transcoder_clamp_reads_its_input_and_edits_its_output(subject, ids):
    """A transcoder reads the MLP's input and writes its output: clamp's codes come from the input, the edit lands
    on the output, in the same forward pass."""
    tc = _tied("relu", hookpoint="mlp_in.5", transcoder=True)
    target = iv.SteeringTarget.from_subject(subject, tc)
    x_in, x_out = (_at(subject, ids, h) for h in (target.read_hookpoint, target.hookpoint))
    code = tc.encode(x_in)
    j = _busiest(code)
    assert code[:, j].max() > 0.05
    with target.intervention([Edit(j, "clamp", 0.0)]):
        got = _at(subject, ids, target.hookpoint)
    assert torch.allclose(got, x_out - code[:, j:j + 1] * tc.decoder_directions()[j], atol=1e-5)


def test_corpus_loss_clean_and_under_interventions(subject):
    d = _tied("relu")
    spec = CorpusSpec("builtin", ctx_len=16, n_tokens=80)
    ablate = lambda: intervene(subject.model, HP, [Edit(2, "ablate")], d)  # noqa: E731
    push = lambda: intervene(subject.model, HP, [Edit(2, "add", 150.0)], d)  # noqa: E731
    noop = lambda: intervene(subject.model, HP, [Edit(2, "add", 0.0)], d)  # noqa: E731
    got = corpus_loss(subject, spec, {"ablate": ablate, "push": push, "noop": noop}, batch_size=2)

    def hf_loss(ctx=None):  # the model's own mean loss per window (every window has ctx_len - 1 targets)
        losses = []
        for batch in iter_windows(spec, subject.tokenizer, batch_size=1):
            w = torch.as_tensor(batch, dtype=torch.long)
            with torch.no_grad(), (ctx() if ctx else torch.no_grad()):
                losses.append(float(subject.model(input_ids=w, labels=w).loss))
        return float(np.mean(losses)), len(losses)

    clean, n_windows = hf_loss()
    assert n_windows == 5 and got.n_tokens == 5 * 15
    assert got.clean == pytest.approx(clean, abs=1e-5)
    assert got.intervened["ablate"] == pytest.approx(hf_loss(ablate)[0], abs=1e-5)
    assert got.intervened["push"] == pytest.approx(hf_loss(push)[0], abs=1e-5)
    assert got.intervened["push"] > got.clean + 0.05  # a hard push along one direction costs loss
    assert got.intervened["noop"] == got.clean


def test_scorer_mode_clamp_and_its_identity(subject):
    from autointerp.jobs.spec import config_options

    # the default leaves existing scores' identities as they were; another mode is a different result
    assert "mode" not in config_options(iv.InterventionConfig())
    assert config_options(iv.InterventionConfig(mode="clamp"))["mode"] == "clamp"
    with pytest.raises(ConfigError, match="intervention.mode 'ablate'"):
        iv.preflight(iv.InterventionConfig(mode="ablate", target=object()), object())
    d = _tied("relu")
    target = iv.SteeringTarget(subject.model, subject.tokenizer, HP, d)
    rec = word_record(random_sentences(10, ["a", "b"], 4, 0), random_sentences(5, ["c"], 4, 1), ["a"], latent=5)
    prompts = iv.DEFAULT_PROMPTS[:2]
    cfg = iv.InterventionConfig(target=target, strengths=(0.0, 40.0), prompts=prompts, max_new_tokens=6, mode="clamp")
    _, _, runs = iv._steer_all(target, rec, cfg)
    want = []
    for p in prompts:  # the latent's code clamped to strength × its max activation, generated here
        enc = subject.tokenizer(p, return_tensors="pt")
        with torch.no_grad(), intervene(subject.model, HP, [Edit(5, "clamp", 40.0 * rec.stats.max_act)], d):
            out = subject.model.generate(**enc, max_new_tokens=6, do_sample=False, temperature=None, top_p=None,
                                         top_k=None, pad_token_id=subject.tokenizer.pad_token_id)
        want.append(subject.tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True))
    assert runs[40.0][0] == want
    added = iv._steer_all(target, rec, dataclasses.replace(cfg, mode="add"))[2]
    assert added[40.0][0] != want  # the mode is used, not the default


# ------------------------------------------------------------------------------------------------- API and CLI


@pytest.fixture
def shared_subject(subject):
    """The API server runs in this process: its model cache holds the session's SmolLM2 (no second copy)."""
    from autointerp.api import runtime

    runtime._MODELS.get(("builtin:smollm2", None), lambda: subject)
    return subject


def _generate(subject, prompt, edits, dictionary, hp, n):
    enc = subject.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad(), intervene(subject.model, hp, edits, dictionary):
        out = subject.model.generate(**enc, max_new_tokens=n, do_sample=False, temperature=None, top_p=None,
                                     top_k=None, pad_token_id=subject.tokenizer.pad_token_id)
    return subject.tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)


def test_steer_endpoint_modes_and_several_latents(api_server, api_env, shared_subject):
    from autointerp.dictionaries import load_cached_dictionary

    cache = api_env["cache"]
    d = load_cached_dictionary(cache.manifest["dictionary"])
    hp = cache.manifest["hookpoint"]
    a, b = api_env["explained"][:2]
    prompt = "The most important thing is"
    url = api_server.url + "/api/v1/steer"
    body = {"dictionary": "xss-mlp2", "prompt": prompt, "strengths": [0.0, 6.0], "max_new_tokens": 8,
            "latents": [{"latent": a, "mode": "clamp", "value": 2.0}, {"latent": b, "value": -1.0}]}
    s, _, out = http("POST", url, body, {"X-API-Key": API_KEY}, timeout=300)
    assert s == 200, out
    assert out["latent"] is None
    assert out["edits"] == [{"latent": a, "mode": "clamp", "value": 2.0}, {"latent": b, "mode": "add", "value": -1.0}]
    # strength 6: latent a's code set to 6 × 2, latent b pushed by -6 × the median norm along its (unit) neuron
    edits = [Edit(a, "clamp", 12.0), Edit(b, "add", -6.0 * out["norm"])]
    assert [c["completion"] for c in out["completions"]] == [_generate(shared_subject, prompt, [], d, hp, 8),
                                                             _generate(shared_subject, prompt, edits, d, hp, 8)]
    assert out["completions"][0]["completion"] != out["completions"][1]["completion"]
    # one latent with a mode: the old request's shape; no add edit: strengths 0 and 1
    s, _, out = http("POST", url, {"dictionary": "xss-mlp2", "latent": a, "mode": "ablate", "prompt": prompt,
                                   "max_new_tokens": 8}, {"X-API-Key": API_KEY}, timeout=300)
    assert s == 200, out
    assert out["latent"] == a and [c["strength"] for c in out["completions"]] == [0.0, 1.0]
    assert out["completions"][1]["completion"] == _generate(shared_subject, prompt, [Edit(a, "ablate")], d, hp, 8)
    for bad in ({"latent": a, "mode": "erase"}, {"latent": a, "latents": [{"latent": b}]}, {},
                {"latents": [{"latent": a, "mode": "zero"}]}, {"latents": []}):
        s, _, err = http("POST", url, {"dictionary": "xss-mlp2", "prompt": prompt, **bad}, {"X-API-Key": API_KEY})
        assert s == 422, (bad, err)
    s, _, err = http("POST", url, {"dictionary": "xss-mlp2", "prompt": prompt,
                                   "latents": [{"latent": a}, {"latent": 10 ** 6, "mode": "clamp"}]},
                     {"X-API-Key": API_KEY})
    assert s == 404 and "latent 1000000 out of range" in err["detail"]


def test_steer_command(subject, tmp_path):
    from autointerp.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["steer", "--help"])
    assert r.exit_code == 0 and "--mode" in r.output and "clamp" in r.output and "--loss-corpus" in r.output
    r = runner.invoke(app, ["steer", "somewhere", "--latent", "1", "--mode", "explode"])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        "error: --mode 'explode': expected one of add, clamp, ablate"]
    r = runner.invoke(app, ["steer", "somewhere", "-l", "1", "-l", "2", "-l", "3", "--value", "1", "--value", "2"])
    assert r.exit_code == 2 and "--value: give one for all latents or one per --latent (3), not 2" in r.output
    ckpt = tmp_path / "sae"
    write_sparsify(ckpt, d_in=576, n=16, k=4)
    common = [str(ckpt), "--model", "builtin:smollm2", "--hookpoint", HP, "--device", "cpu"]
    r = runner.invoke(app, ["steer", *common, "--latent", "16"])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        "error: --latent 16 out of range (the dictionary has 16 latents)"]
    prompt = "My favorite"
    r = runner.invoke(app, ["steer", *common, "--prompt", prompt, "--latent", "3", "--latent", "5", "--mode", "ablate",
                            "--max-new-tokens", "5", "--loss-corpus", "builtin", "--loss-tokens", "48",
                            "--ctx-len", "16", "--no-progress"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith(f"{HP} (median norm") and lines[0].endswith("#3 ablate, #5 ablate")
    clean = _generate(subject, prompt, [], None, HP, 5)
    assert lines[1] == f"  strength 0: {json.dumps(prompt + clean)}" and lines[2].startswith("  strength 1: ")
    # the printed clean loss is the model's own loss over the same windows
    spec = CorpusSpec("builtin", ctx_len=16, n_tokens=48)
    with torch.no_grad():
        windows = [torch.as_tensor(b, dtype=torch.long) for b in iter_windows(spec, subject.tokenizer, 1)]
        want = np.mean([float(subject.model(input_ids=w, labels=w).loss) for w in windows])
    head, _, got = lines[3].rpartition(" ")
    assert head == "next-token loss on builtin (45 tokens): clean" and float(got) == pytest.approx(want, abs=1e-4)
    assert lines[4].startswith("  strength 1: ")
