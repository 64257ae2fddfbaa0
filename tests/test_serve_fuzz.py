"""Schemathesis over every route in /openapi.json: generated requests, valid and invalid, must get a 2xx
or an OpenAI-shaped 4xx (its ``not_a_server_error`` check, plus the error shape). Bounded by a fixed
number of examples per route: a quick pass in the default suite, a longer one marked slow."""
import json
import os

import pytest

from gptlab.serve.app import Limits, create_app
from gptlab.serve.store import Store
from tests.test_serve import FakeBackend, LiveServer, page_client, tok  # noqa: F401  (fixture)

schemathesis = pytest.importorskip("schemathesis")   # a dev dependency (pyproject [dev])
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402


@pytest.fixture(scope="module")
def served(tok, tmp_path_factory):  # noqa: F811
    store = Store(tmp_path_factory.mktemp("db") / "chat.sqlite3")
    app = create_app(FakeBackend(tok, delay=0.0005), store=store, limits=Limits(max_tokens_limit=64))
    with LiveServer(app) as s:
        page = page_client(s)
        cid = page.post("/api/conversations", json={"title": "seed"}).json()["id"]
        page.post(f"/api/conversations/{cid}/messages", json={"content": "hello", "max_tokens": 8}).read()
        s.token = page.headers["X-CSRF-Token"]
        s.schema = schemathesis.openapi.from_dict(app.openapi())
        yield s
    store.close()


def _fuzz(served, examples: int) -> int:
    sent = 0
    for result in served.schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                nonlocal sent
                headers = {**(case.headers or {}), "X-CSRF-Token": served.token}
                response = case.call(base_url=served.url, headers=headers, timeout=30)
                sent += 1
                case.validate_response(response, checks=[not_a_server_error])
                if response.status_code >= 400:
                    assert set(json.loads(response.content)["error"]) == {"message", "type", "param", "code"}
            try:
                check()
            except Unsatisfiable:   # nothing invalid to generate (a route without inputs)
                assert mode == GenerationMode.NEGATIVE
    return sent


def test_schemathesis_finds_no_server_error(served):
    assert _fuzz(served, int(os.environ.get("GPTLAB_FUZZ_EXAMPLES", "5"))) > 60


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_schemathesis_long_run(served):
    assert _fuzz(served, 100) > 1500
