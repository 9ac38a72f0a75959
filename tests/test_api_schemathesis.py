"""schemathesis against the committed OpenAPI contract, a real uvicorn server and a real store: generated requests
(valid and invalid) to every operation, unauthenticated and with a key, never get a server error. Bounded: a few
examples per operation."""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from api_support import API_KEY, ApiServer, api_env  # noqa: F401 (fixtures)
from autointerp.api.__main__ import OPENAPI

schema = schemathesis.openapi.from_dict(json.loads(OPENAPI.read_text()))
# with a key, everything but the model endpoints (each call runs SmolLM2: tested on their own in test_api_model)
keyed = schema.exclude(path_regex=r"/(activations|steer)$")

SETTINGS = settings(max_examples=6, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def api_server(api_env, tmp_path_factory):
    """A server of its own on a copy of the shared store (generated writes land there), that never runs jobs
    (a generated valid spec would start a real explainer)."""
    import sqlite3

    from autointerp.api import Settings

    path = tmp_path_factory.mktemp("schemathesis") / "store.db"
    src = sqlite3.connect(api_env["url"].removeprefix("sqlite:///"))
    dst = sqlite3.connect(path)
    src.backup(dst)
    src.close()
    dst.close()
    srv = ApiServer(Settings(database_url=f"sqlite:///{path}", embedded_runner=False))
    yield srv
    srv.stop()


def _check(case, response) -> None:
    assert response.status_code < 500, (case.method, case.formatted_path, response.status_code, response.text[:500])
    if response.status_code >= 400:
        body = response.json()  # every error is a Problem body
        assert body["error"] and body["detail"], body


@schema.parametrize()
@SETTINGS
def test_no_server_errors_unauthenticated(case, api_server):
    response = case.call(base_url=api_server.url, timeout=60)
    _check(case, response)
    if case.method.upper() == "POST" and case.operation.method.upper() == "POST":
        assert response.status_code in (401, 413), (case.formatted_path, response.status_code)


@keyed.parametrize()
@SETTINGS
def test_no_server_errors_with_a_key(case, api_server):
    response = case.call(base_url=api_server.url, headers={"X-API-Key": API_KEY}, timeout=120)
    _check(case, response)
