"""Meta-dictionaries: a TopK dictionary trained on another dictionary's decoder rows finds the directions those rows
are built from, and lists, per meta-latent, exactly the base latents that contain its direction."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from autointerp.cli import app
from autointerp.dictionaries import load_dictionary
from autointerp.errors import ConfigError
from autointerp.meta import SIDECAR, base_rows, load_meta_dictionary, meta_members, train_meta_dictionary

# what makes the planted test fast and reliable here: a high lr, 2000 steps of 256 rows, one thread (~4 s a seed)
FAST = dict(steps=2000, lr=1e-2, num_threads=1)


def planted(n=2048, d=64, atoms=64, active=3, seed=0):
    """n rows, each the normalised sum of `active` of `atoms` random unit vectors; (vectors, which per row, rows)."""
    g = torch.Generator().manual_seed(100 + seed)
    V = torch.randn(atoms, d, generator=g)
    V /= V.norm(dim=1, keepdim=True)
    which = torch.rand(n, atoms, generator=g).argsort(-1)[:, :active]
    rows = V[which].sum(1)
    return V, which, rows / rows.norm(dim=1, keepdim=True)


def write_base(folder, rows, activation="topk", k=4, seed=0):
    """A sparsify-layout dictionary whose decoder rows are `rows` times random positive scales (a meta-dictionary
    must not care about the base's row norms)."""
    g = torch.Generator().manual_seed(seed)
    n, d = rows.shape
    scales = torch.rand(n, 1, generator=g) * 4 + 0.25
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"encoder.weight": torch.randn(n, d, generator=g) / d ** 0.5, "encoder.bias": torch.zeros(n),
               "W_dec": (rows * scales).contiguous(), "b_dec": torch.zeros(d)}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"activation": activation, "k": k, "num_latents": n, "d_in": d}))
    return folder


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_planted_directions_and_their_members(tmp_path, seed):
    V, which, rows = planted(seed=seed)
    base = write_base(tmp_path / "base" / "layers.3", rows, seed=seed)
    r = train_meta_dictionary(base, 64, 3, out_dir=tmp_path / "meta", seed=seed, **FAST)

    # the same checkpoint layout as train-sae: any loader reads it; the sidecar names the base
    meta, info = load_meta_dictionary(tmp_path / "meta")
    assert r.path == tmp_path / "meta" / "layers.3" and (r.path / SIDECAR).is_file()
    assert (meta.format, meta.n_latents, meta.d_in, meta.k) == ("sparsify", 64, 64, 3)
    assert info["base"]["source"] == str(base.resolve()) and info["base"]["n_units"] == 2048
    assert torch.equal(load_dictionary(r.path).decoder_directions(), meta.decoder_directions())

    # >= 80 % of the planted vectors have a meta decoder row at cosine > 0.9
    cos = V @ meta.decoder_directions().T  # [planted, meta]
    best_cos, match = cos.max(1)
    recovered = best_cos > 0.9
    assert recovered.float().mean() >= 0.8, best_cos

    # members: the meta-latent matching v fires on exactly the rows built with v (up to 3 % of them)
    members = meta_members(meta, base_rows(load_dictionary(base)))
    assert len(members) == 64
    wrong = total = 0
    for v in recovered.nonzero().flatten().tolist():
        expected = set((which == v).any(1).nonzero().flatten().tolist())
        got = {i for i, _ in members[int(match[v])]}
        wrong += len(expected ^ got)
        total += len(expected)
    print(f"seed {seed}: recovered {recovered.float().mean():.2f}, member errors {wrong}/{total}")
    assert wrong <= 0.03 * total, (wrong, total)

    # sorted by activation, `top` keeps the first ones; scaled rows give the same members (normalised inside)
    for m in members:
        assert [a for _, a in m] == sorted((a for _, a in m), reverse=True) and all(a > 0 for _, a in m)
    assert meta_members(meta, rows, top=5) == [m[:5] for m in meta_members(meta, rows)]
    assert _same(meta_members(meta, rows * 3.0), members)
    assert _same(meta_members(r.model, rows), members)  # the trained module encodes as the loaded checkpoint


def _same(a, b) -> bool:
    """The same members with the same activations up to float rounding (the rows reach the encoder through
    different scalings, so near-equal activations may swap places)."""
    return len(a) == len(b) and all(dict(x).keys() == dict(y).keys() and all(
        abs(v - dict(y)[i]) < 1e-5 for i, v in x) for x, y in zip(a, b))


def test_signed_base_rows_are_its_poles(tmp_path):
    """An AbsTopK base is stored as 2n units ("+" poles, then "-" poles): the meta-dictionary reads the same units,
    the "-" pole's row negated, so a meta-latent's members are the store's unit numbers."""
    _, _, rows = planted(n=32, d=16, atoms=8)
    d = load_dictionary(write_base(tmp_path / "b" / "h", rows, activation="abstopk"))
    assert d.signed
    br = base_rows(d)
    assert br.shape == (64, 16)
    torch.testing.assert_close(br[:32], rows)
    torch.testing.assert_close(br[32:], -rows)
    r = train_meta_dictionary(d, 8, 2, out_dir=tmp_path / "m", steps=50, num_threads=1)
    assert r.info["base"]["signed"] and r.info["base"]["n_units"] == 64


def test_bad_arguments(tmp_path):
    _, _, rows = planted(n=16, d=8, atoms=4)
    base = write_base(tmp_path / "b" / "h", rows)
    with pytest.raises(ConfigError, match="need 1 <= k <= n_latents"):
        train_meta_dictionary(base, 4, 8, out_dir=tmp_path / "m")
    with pytest.raises(ConfigError, match="no such file or folder"):
        train_meta_dictionary(tmp_path / "missing", 4, 2, out_dir=tmp_path / "m")
    with pytest.raises(ConfigError, match="not made by train-sae --on-decoder"):
        load_meta_dictionary(base)
    with pytest.raises(ConfigError, match=r"\[N, d\]"):
        meta_members(load_dictionary(base), rows[0])


def _add_to_store(base, texts: dict[int, str]) -> None:
    """Register `base` in the test's store as if extracted, with one LLM explanation per listed latent and then,
    newer, a token-frequency baseline for each (which meta-members must not prefer)."""
    from autointerp.jobs.spec import digest
    from autointerp.store import open_store
    from autointerp.store.store import T_DICT, T_SUBJECT

    store, d = open_store(), load_dictionary(base)
    with store.tx(write=True) as conn:
        subject = conn.execute(T_SUBJECT.insert().values(name="m")).inserted_primary_key[0]
        pk = conn.execute(T_DICT.insert().values(
            key=f"{d.id}@{d.hookpoint}", name="base-h", dictionary_id=d.id, subject_model_id=subject,
            hookpoint=d.hookpoint, format=d.format, source=str(base), n_latents=d.n_latents, d_in=d.d_in,
        )).inserted_primary_key[0]
        for i, (kind, text) in [*((i, ("default", t)) for i, t in texts.items()),
                                *((i, ("token_frequency", "baseline words")) for i in texts)]:
            store.insert_explanation(conn, {
                "dictionary_pk": pk, "latent": i, "explain_key": digest({"k": kind}), "explainer": kind,
                "model": "judge", "prompt_version": "p@1", "seed": 0, "text": text, "skipped": None,
                "parsed": True, "examples_used": [], "usage": {}, "cost_usd": 0.0})


def test_cli_train_on_decoder_then_members(tmp_path):
    V, which, rows = planted(n=512, d=16, atoms=16, seed=3)
    base = write_base(tmp_path / "base" / "layers.1", rows)
    runner = CliRunner()
    r = runner.invoke(app, ["train-sae", "--on-decoder", str(base), "--n-latents", "16", "--k", "3", "--steps",
                            "300", "--lr", "1e-2", "--threads", "1", "--out", str(tmp_path / "meta")])
    assert r.exit_code == 0, r.output
    assert f"wrote {tmp_path / 'meta' / 'layers.1'}" in r.output and "16x k=3 on 512 decoder rows" in r.output
    assert (tmp_path / "meta" / "layers.1" / SIDECAR).is_file()

    r = runner.invoke(app, ["meta-members", str(tmp_path / "meta"), "--top", "4", "--latents", "0-2"])
    assert r.exit_code == 0, r.output
    assert "16 meta-latents on 512 decoder rows" in r.output
    assert "meta #0: fires on" in r.output and "meta #3" not in r.output

    # --json: the same members as the library; with --store, each base latent's newest non-baseline explanation
    meta, _ = load_meta_dictionary(tmp_path / "meta")
    members = meta_members(meta, base_rows(load_dictionary(base)))  # the rows as the CLI reads them
    _add_to_store(base, {i: f"explanation of base latent {i}" for i in range(512)})
    r = runner.invoke(app, ["meta-members", str(tmp_path / "meta"), "--base", str(base), "--top", "4", "--store",
                            "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert [o["meta_latent"] for o in out] == list(range(16))
    for o in out:
        assert [(m["unit"], pytest.approx(m["activation"])) for m in o["members"]] == members[o["meta_latent"]][:4]
        assert o["n_members"] == len(members[o["meta_latent"]])
        assert all(m["explanation"] == f"explanation of base latent {m['unit']}" for m in o["members"])
    r = runner.invoke(app, ["meta-members", str(tmp_path / "meta"), "--store-dictionary", "base-h", "--latents",
                            "5"])
    first = members[5][0][0]
    assert r.exit_code == 0 and f"#{first}" in r.output and f"explanation of base latent {first}" in r.output

    # --save: the member lists become an analysis of the base; its page lists each meta-latent's base latents with
    # their explanations
    from api_support import ApiServer, http
    from autointerp.api import Settings
    from autointerp.store import open_store
    from autointerp.store.analyses import analyses, analysis

    r = runner.invoke(app, ["meta-members", str(tmp_path / "meta"), "--store-dictionary", "base-h", "--save",
                            "--latents", "0"])
    assert r.exit_code == 0, r.output
    store = open_store()
    (a,) = analyses(store, kind="meta")
    rows = analysis(store, a["id"])["result"]["rows"]
    assert [[(u, pytest.approx(v, abs=1e-4)) for u, v in row["members"]] for row in rows] == [m[:50] for m in members]
    with ApiServer(Settings(database_url=store.url)) as srv:
        s, _, html = http("GET", srv.url + f"/analyses/{a['id']}")
        assert s == 200
        alive = [j for j, m in enumerate(members) if m]
        assert html.count(b'class="meta-latent card"') == len(alive)
        assert html.count(b'class="member"') == sum(min(50, len(m)) for m in members)
        u = members[alive[0]][0][0]
        assert f"explanation of base latent {u}".encode() in html


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "autointerp.cli", *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=300)
    r = run("train-sae", "--on-decoder", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing: no such file or folder" in r.stderr
    assert not (tmp_path / "o").exists()
    r = CliRunner().invoke(app, ["meta-members", str(tmp_path)])
    assert r.exit_code == 2 and "not made by train-sae --on-decoder" in r.output
    (tmp_path / "base").mkdir()
    r = CliRunner().invoke(app, ["meta-members", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "no such folder" in r.output


def test_meta_latents_explained_and_scored_through_the_job_seam(tmp_path):
    """`meta-members --save` registers the meta-dictionary; `interpret` explains each meta-latent from its base
    latents' explanations (explainer `meta`, a real HTTP explainer) and the embedding scorer (the real MiniLM) tests
    the explanation on held-out members against non-members. Base latent i is explained by the themes of the planted
    vectors it is built from, so the meta-latent matching vector v must be explained by v's theme and score high."""
    from api_support import ApiServer, http
    from autointerp.api import Settings
    from autointerp.store import open_store
    from autointerp.store.analyses import analyses
    from judges_meta import THEMES
    from llm_server_fixture import start_llm_server

    V, which, rows = planted(n=512, d=16, atoms=16, seed=3)
    base = write_base(tmp_path / "base" / "layers.1", rows)
    r = train_meta_dictionary(base, 16, 3, out_dir=tmp_path / "meta", seed=3, steps=600, lr=1e-2, num_threads=1)
    themes = {i: "text about " + ", ".join(THEMES[int(v)] for v in which[i]) for i in range(512)}
    _add_to_store(base, themes)
    runner = CliRunner()
    out = runner.invoke(app, ["meta-members", str(tmp_path / "meta"), "--store-dictionary", "base-h", "--save",
                              "--latents", "0"])
    assert out.exit_code == 0, out.output
    store = open_store()
    (a,) = analyses(store, kind="meta")
    (md,) = [d for d in store.dictionaries() if d["format"] == "meta-dictionary"]
    assert f"as dictionary {md['name']}" in out.output and md["hookpoint"] == "meta:base-h"
    assert md["n_latents"] == 16 and md["manifest"]["meta"]["analysis_id"] == a["id"]

    # a token explainer or a judge scorer on a meta-dictionary, or the meta explainer on a token one: one line, exit 2
    bad = runner.invoke(app, ["interpret", md["name"], "--scorers", "detection", "--no-progress"])
    assert bad.exit_code == 2 and "meta-dictionary" in bad.output and "--scorers embedding" in bad.output
    bad = runner.invoke(app, ["interpret", md["name"], "--explainer", "token_frequency", "--scorers", "embedding"])
    assert bad.exit_code == 2 and "reads token examples" in bad.output
    bad = runner.invoke(app, ["interpret", "base-h", "--explainer", "meta", "--scorers", ""])
    assert bad.exit_code == 2 and "is not one" in bad.output

    with start_llm_server(judge="judges_meta:meta_judge") as srv:
        res = runner.invoke(app, ["interpret", md["name"], "--latents", "all", "--scorers", "embedding",
                                  "--explainer-model", f"openai:judge@{srv.base_url}", "--no-progress"])
        assert res.exit_code == 0, res.output
        assert srv.stats()["requests"] == md["n_alive"] > 0  # one call per meta-latent that fires on something

    meta, _ = load_meta_dictionary(r.path)
    cos = V @ meta.decoder_directions().T
    best, match = cos.max(1)
    expl = {e["latent"]: e for e in store.explanations(md["id"], with_text=True)}
    matched = [(int(v), int(match[v])) for v in range(16) if best[v] > 0.9]
    assert len(matched) >= 12, best
    for v, j in matched:
        e = expl[j]
        assert e["text"] == THEMES[v], (v, j, e["text"])
        assert e["explainer"] == "meta" and e["prompt_version"].startswith("explain_meta@")
        # the explainer saw every other explained member, strongest first; the scorer tests on the rest
        members = [u for u, _ in meta_members(meta, base_rows(load_dictionary(base)))[j]]
        assert list(e["examples_used"]) == members[0::2][:15]
    scores = {s["explanation_id"]: s for s in store.scores([e["id"] for e in expl.values()])}
    aucs = [scores[expl[j]["id"]]["metrics"]["auc"] for _, j in matched]
    assert min(aucs) > 0.8 and sum(aucs) / len(aucs) > 0.9, aucs
    # the same records scored with another meta-latent's theme separate nothing: the scorer can fail
    from autointerp.meta import MetaSource
    from autointerp.scorers.embedding import EmbeddingConfig, score_members

    src = MetaSource(store, md)
    wrong = [score_members(src.record(j), THEMES[(v + 5) % 16], EmbeddingConfig(), 0).metrics["auc"]
             for v, j in matched]
    assert sum(wrong) / len(wrong) < 0.7, wrong
    for _, j in matched:
        det = scores[expl[j]["id"]]["details"]
        assert not set(det["units"][:15]) & set(expl[j]["examples_used"])  # held out from the explainer

    # the meta-latent's page lists its base latents with their explanations and links; the API returns them
    v, j = matched[0]
    with ApiServer(Settings(database_url=store.url)) as srv:
        s, _, html = http("GET", srv.url + f"/d/{md['id']}/{j}")
        assert s == 200 and b'id="meta-members"' in html and THEMES[v].encode() in html
        members = meta_members(meta, base_rows(load_dictionary(base)))[j]
        assert html.count(b'class="member"') == min(50, len(members))
        assert f'href="/d/{md["manifest"]["meta"]["base_pk"]}/{members[0][0]}"'.encode() in html
        s, _, body = http("GET", srv.url + f"/api/v1/dictionaries/{md['id']}/latents/{j}")
        got = body["meta"]
        assert [m["unit"] for m in got["members"]] == [u for u, _ in members[:50]]
        assert got["members"][0]["explanation"] == themes[members[0][0]] and got["n_members"] == len(members)
        s, _, html = http("GET", srv.url + f"/analyses/{a['id']}")  # the analysis links to the meta-latents
        assert f'href="/d/{md["id"]}/{j}"'.encode() in html and THEMES[v].encode() in html
