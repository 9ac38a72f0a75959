"""A real package: a wheel built from the checkout, installed non-editable into a fresh folder, runs from a folder
outside the checkout (so nothing can come from the source tree): `db upgrade` migrates a new store with the
migrations the wheel carries, `interpret` explains and scores against the test LLM server with the packaged
prompts, and `serve` answers. Dependencies come from this venv's site-packages (pip install --no-deps --target)."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

from llm_server_fixture import start_llm_server

ROOT = Path(__file__).resolve().parents[1]
N_LATENTS = 2


@pytest.fixture(scope="module")
def wheel_target(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the checkout's sources (no stale build/ folder, symlinks kept as links so the
    build must carry the files behind autointerp/prompts), then install it into an empty folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("autointerp", "prompts"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=ignore)
    assert (src / "autointerp" / "prompts").is_symlink()
    dist = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
                    "-q", "-w", str(dist), str(src)], check=True, capture_output=True, timeout=300)
    (whl,) = dist.glob("autointerp-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    want = {f"autointerp/db/{p.relative_to(ROOT / 'autointerp' / 'db')}"
            for p in (ROOT / "autointerp" / "db").rglob("*") if p.suffix in (".py", ".mako")}
    want |= {f"autointerp/prompts/{p.name}" for p in (ROOT / "prompts").glob("*.md")}
    want |= {f"autointerp/{p.relative_to(ROOT / 'autointerp')}" for p in (ROOT / "autointerp" / "data").rglob("*")
             if p.is_file()}  # the demo's shipped SAEs
    assert sum(1 for w in want if w.endswith("sae.safetensors")) == 2
    assert {"autointerp/db/env.py", "autointerp/db/script.py.mako"} <= want
    assert want <= names, sorted(want - names)
    target = tmp / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target",
                    str(target), str(whl)], check=True, capture_output=True, timeout=300)
    prompts = target / "autointerp" / "prompts"
    assert prompts.is_dir() and not prompts.is_symlink()
    return target


def _env(target: Path, db: Path) -> dict:
    # PYTHONPATH puts the wheel's copy ahead of the venv's editable one; no tests/ or checkout on the path
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AUTOINTERP_PROMPTS")}
    return {**env, "PYTHONPATH": str(target), "AUTOINTERP_DATABASE_URL": f"sqlite:///{db}", "OPENAI_API_KEY": "x",
            "HF_HUB_OFFLINE": "1", "AUTOINTERP_LLM_CACHE": "off"}


def _run(target, args, env, cwd) -> subprocess.CompletedProcess:
    # the console script pip wrote (bin/autointerp -> autointerp.cli:app)
    r = subprocess.run([str(target / "bin" / "autointerp"), *args], capture_output=True, text=True, env=env,
                       cwd=cwd, timeout=300)
    assert r.returncode == 0, f"autointerp {' '.join(args)}: {r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


def _version(name: str) -> str:
    return f"{name}@{hashlib.sha256((ROOT / 'prompts' / f'{name}.md').read_bytes()).hexdigest()[:12]}"


def test_wheel_migrates_interprets_and_serves(wheel_target, small_cache, tmp_path):
    target = wheel_target
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    db = tmp_path / "wheel_store.db"
    env = _env(target, db)
    where = subprocess.run([sys.executable, "-c", "import autointerp, autointerp.prompt_files as p, "
                            "autointerp.store.engine as e; print(autointerp.__file__); print(p.prompts_dir()); "
                            "print(e.MIGRATIONS)"], capture_output=True, text=True, env=env, cwd=cwd, check=True)
    for line in where.stdout.split():
        assert Path(line).resolve().is_relative_to(target.resolve()), where.stdout

    # 1. a fresh store, migrated by the wheel's own migrations to the newest revision
    r = _run(target, ["db", "upgrade"], env, cwd)
    heads = {p.name.split("_")[0] for p in (ROOT / "autointerp" / "db" / "versions").glob("[0-9]*.py")}
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone()[0] == max(heads), r.stdout
        assert {"dictionary", "latent", "explanation", "score"} <= {
            x for (x,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}

    # 2. interpret with the test server's rule-based judge: rows carry the packaged prompts' versions
    n_active = small_cache.stats["n_active"]
    latents = sorted(int(i) for i in np.argsort(-np.where(n_active <= 60, n_active, 0))[:N_LATENTS])
    assert n_active[latents].min() >= 20
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        r = _run(target, ["interpret", str(small_cache.path), "--latents", ",".join(map(str, latents)),
                          "--explainer-model", f"openai:judge@{srv.base_url}", "--scorers", "detection",
                          "--no-hard-negatives", "--no-progress"], env, cwd)
        assert srv.stats()["requests"] > N_LATENTS
    assert f"{N_LATENTS} latents done, 0 already done, 0 skipped, 0 failed" in r.stdout, r.stdout
    with sqlite3.connect(db) as conn:
        expl = conn.execute("SELECT latent, text, prompt_version FROM explanation ORDER BY latent").fetchall()
        scores = conn.execute("SELECT scorer, prompt_version, value FROM score").fetchall()
    assert [e[0] for e in expl] == latents and all(e[1] for e in expl)
    assert {e[2] for e in expl} == {_version("explain_default")}
    assert len(scores) == N_LATENTS and {s[:2] for s in scores} == {("detection", _version("detection"))}
    assert all(s[2] is not None for s in scores)

    # 3. serve: the API and the home page
    proc = subprocess.Popen([str(target / "bin" / "autointerp"), "serve", "--port", "0", "--no-run-jobs"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    try:
        line = proc.stdout.readline()
        assert "serving http://" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        base = line.split()[2]
        deadline = time.monotonic() + 60  # the URL is printed when the socket is bound, before the app starts
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/v1/health", timeout=10) as h:
                    assert h.status == 200
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "the server did not come up"
                time.sleep(0.2)
        with urllib.request.urlopen(f"{base}/", timeout=30) as page:
            assert page.status == 200 and "<html" in page.read().decode().lower()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
