"""compose.yaml, checked without a Docker engine: it parses, has the services the deployment needs, every service
running our image runs a real `autointerp` command (parsed by the CLI itself, options included), and every
environment variable it uses — and every one the queue layer reads — is documented in the README's table."""

from __future__ import annotations

import re
from pathlib import Path

import typer.main
import yaml

from autointerp import cli
from autointerp.jobs.dispatch import ENV, QUEUES

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> tuple[dict, str]:
    text = (ROOT / "compose.yaml").read_text()
    return yaml.safe_load(text), text


def _readme_env_table() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Environment variables", 1)
    assert len(section) == 2, "README has no 'Environment variables' section"
    first_cells = [line.split("|")[1] for line in section[1].splitlines() if line.startswith("|")]
    return {v for cell in first_cells for v in re.findall(r"`([A-Z][A-Z0-9_]*)`", cell)}


def _ours(svc: dict) -> bool:
    return "build" in svc or str(svc.get("image", "")).startswith("${AUTOINTERP_IMAGE")


def test_compose_has_the_services_and_resources():
    doc, _ = _compose()
    services = doc["services"]
    assert {"redis", "postgres", "api", "worker-gpu", "worker-llm", "flower"} <= set(services)
    assert "gpu" in services["worker-gpu"]["command"][services["worker-gpu"]["command"].index("--queues") + 1]
    assert services["postgres"]["image"].startswith("pgvector/pgvector")
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in gpu)
    assert int(services["worker-llm"]["deploy"]["replicas"]) >= 2
    assert "--save" in services["redis"]["command"]  # like ours: nothing on disk, the database is the truth
    for name in ("worker-gpu", "worker-llm"):
        assert services[name]["build"]["dockerfile"] == "workers/Dockerfile"
        assert (ROOT / services[name]["build"]["dockerfile"]).is_file()
    for name, svc in services.items():  # every dependency is a service
        deps = svc.get("depends_on", [])
        assert set(deps) <= set(services), name


def test_every_service_command_exists_in_the_package():
    doc, _ = _compose()
    root = typer.main.get_command(cli.app)
    checked = 0
    for name, svc in doc["services"].items():
        cmd = svc.get("command")
        if not _ours(svc):
            if name == "flower":
                assert cmd[0] == "celery" and "flower" in cmd
                broker = next(a.split("=", 1)[1] for a in cmd if a.startswith("--broker="))
                assert broker == doc["x-autointerp"]["environment"]["AUTOINTERP_BROKER_URL"]
            continue
        assert isinstance(cmd, list) and cmd, name
        group, args = root, list(cmd)
        while hasattr(group, "list_commands"):  # walk `db upgrade`-style subcommands (typer vendors its click)
            sub = group.get_command(group.context_class(group), args[0])
            assert sub is not None, f"{name}: `autointerp {' '.join(cmd)}`: no command {args[0]!r}"
            group, args = sub, args[1:]
        ctx = group.make_context(f"autointerp {cmd[0]}", args)  # parses and checks every option
        if cmd[0] == "worker":
            assert set(ctx.params["queues"].split(",")) <= set(QUEUES), name
        checked += 1
    assert checked >= 3  # migrate, worker-gpu, worker-llm


def test_every_environment_variable_is_documented_in_the_readme():
    doc, text = _compose()
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", text))
    for svc in list(doc["services"].values()) + [doc["x-autointerp"]]:
        env = svc.get("environment") or {}
        used |= set(env) if isinstance(env, dict) else {e.split("=", 1)[0] for e in env}
    used |= set(ENV)  # every variable the queue layer reads
    documented = _readme_env_table()
    missing = sorted(used - documented)
    assert not missing, f"README 'Environment variables' table lacks {missing}"
