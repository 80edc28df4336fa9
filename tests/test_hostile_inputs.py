"""The hostile-input suite (tests/hostile_inputs.py), one test per case, against a live `bentoml serve`.

    pytest -m live                       # these, and the other live-server tests
"""
from __future__ import annotations

import pytest

from hostile_inputs import PICKLE_MARKER, Ctx, cases, run_case
from service_helpers import export_tiny, live_server, photos

pytestmark = [pytest.mark.slow, pytest.mark.live]
CASES = cases()


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory):
    PICKLE_MARKER.unlink(missing_ok=True)
    artifact = export_tiny(tmp_path_factory.getbasetemp())
    with live_server(artifact, tmp_path_factory.mktemp("hostile")) as client:
        info = client.get("/model").json()
        yield client, Ctx(str(client.base_url).rstrip("/"), info["limits"], photos(1)[0].read_bytes(), info["classes"])
        # after every case: still ready, still answering, and nothing a request supplied was unpickled
        assert client.get("/readyz").status_code == 200
        normal = client.post("/classify", files={"image": ("a.jpg", photos(1)[0].read_bytes(), "image/jpeg")})
        assert normal.status_code == 200
        assert not PICKLE_MARKER.exists()


def test_case_names_are_unique():
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(hostile_server, case):
    client, ctx = hostile_server
    result = run_case(client, case, ctx)
    assert result["ok"], f"{case.what}: {result['problems']} (status {result['status']}: {result['response'][:200]!r})"
