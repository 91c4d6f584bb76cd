"""Property-based requests generated from /openapi.json: no input makes the service answer 5xx, and every answer
conforms to the document (status codes, content types, schemas)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from app.auth import create_token
from app.main import create_app
from tests.service.conftest import make_settings

APP = create_app(make_settings(Path(tempfile.mkdtemp(prefix="cbd-schemathesis-")), rate_limit_per_minute=0,
                               auth="on", max_concurrent_jobs=0))
with APP.state.session_factory() as _session:
    TOKEN, _ = create_token(_session, ["read", "build", "admin"])
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case) -> None:  # noqa: ANN001
    if case.headers is None or "Authorization" not in case.headers:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {TOKEN}"}
    response = case.call()
    assert response.status_code < 500, (case.method, case.formatted_path, response.text)
    case.validate_response(response, checks=[status_code_conformance, content_type_conformance,
                                             response_schema_conformance, negative_data_rejection])
