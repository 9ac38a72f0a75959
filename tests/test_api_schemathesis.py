"""schemathesis against the committed OpenAPI contract, a real uvicorn server and a real store: generated requests
(valid and invalid) to every operation, unauthenticated and with a key, never get a server error, and every
response conforms to the contract (status code, content type, headers and body against the schema; errors are
Problem bodies). The fast GET-latent path (api/fast.py, which serialises its own bytes) is in the contract and is
driven with real dictionaries and latents, so its bodies are validated too.

Examples per operation: 50 under CI=true, fewer locally (AUTOINTERP_SCHEMATHESIS_EXAMPLES overrides both)."""

from __future__ import annotations

import json
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_headers_conformance,
                                 response_schema_conformance, status_code_conformance)

from api_support import API_KEY, ApiServer, api_env  # noqa: F401 (fixtures)
from autointerp.api.__main__ import OPENAPI

CI = os.environ.get("CI", "").lower() == "true"
N_EXAMPLES = int(os.environ.get("AUTOINTERP_SCHEMATHESIS_EXAMPLES") or (50 if CI else 10))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
LATENT_PATH = "/api/v1/dictionaries/{ref}/latents/{index}"

schema = schemathesis.openapi.from_dict(json.loads(OPENAPI.read_text()))
# with a key, everything but the model endpoints (each call runs SmolLM2: tested on their own in test_api_model)
keyed = schema.exclude(path_regex=r"/(activations|steer|diffs)$")

# derandomized (the same cases every run), no shrinking: a failure is reported as generated
SETTINGS = settings(max_examples=N_EXAMPLES, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


def test_the_fast_latent_route_is_in_the_contract():
    """The route served by api/fast.py is an operation of the committed schema (so the tests below generate for
    it), answering LatentDetail."""
    spec = json.loads(OPENAPI.read_text())
    op = spec["paths"][LATENT_PATH]["get"]
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/LatentDetail"}
    assert {p["name"] for p in op["parameters"]} == {"ref", "index", "n_top"}
    assert schema[LATENT_PATH]["GET"] is not None


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
    """Beyond the contract: every error body carries its error and detail."""
    if response.status_code >= 400:
        body = response.json()
        assert body["error"] and body["detail"], body


@schema.parametrize()
@SETTINGS
def test_contract_unauthenticated(case, api_server):
    response = case.call_and_validate(base_url=api_server.url, checks=CHECKS, timeout=60)
    _check(case, response)
    if case.method.upper() == "POST" and case.operation.method.upper() == "POST":  # not a wrong-method probe
        assert response.status_code in (401, 413), (case.formatted_path, response.status_code)


@keyed.parametrize()
@SETTINGS
def test_contract_with_a_key(case, api_server):
    response = case.call_and_validate(base_url=api_server.url, headers={"X-API-Key": API_KEY}, checks=CHECKS,
                                      timeout=120)
    _check(case, response)


@settings(max_examples=N_EXAMPLES, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_contract_of_the_fast_latent_route_on_real_latents(data, api_server, api_env):
    """Generated requests whose dictionary and latent exist (by name and by id, explained or not): the fast path
    answers them, and its bytes conform to LatentDetail."""
    d = data.draw(st.sampled_from([api_env["dictionary"], api_env["dictionary2"]]))
    ref = data.draw(st.sampled_from([d["name"], str(d["id"])]))
    index = data.draw(st.sampled_from(api_env["explained"][:8]) | st.integers(0, d["n_latents"] - 1))
    case = data.draw(schema[LATENT_PATH]["GET"].as_strategy(path_parameters={"ref": ref, "index": index}))
    fast = api_server.app.state.fast_latent
    before = fast.hits + fast.misses
    response = case.call_and_validate(base_url=api_server.url, checks=CHECKS, timeout=60)
    _check(case, response)
    n_top = (case.query or {}).get("n_top", 20)
    if isinstance(n_top, int) and 0 <= n_top <= 100 and set(case.query or {}) <= {"n_top"}:
        assert response.status_code == 200, (case.formatted_path, case.query, response.text[:300])
        body = response.json()
        assert body["index"] == index and len(body["top"]) <= n_top
        assert fast.hits + fast.misses == before + 1, "not answered by the fast path"
