"""Tracking under load: trial-like processes log per-step metrics at once to one real
`mlflow server`, over SQLite and over PostgreSQL; every value is counted back, and counted
again after the server restarts on the same port and stores."""

import pytest
from servers import count_back, log_concurrently

PROCESSES, STEPS = 8, 10


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_trials_lose_no_metric(backend, mlflow_servers, request):
    uri = request.getfixturevalue("postgres").uri if backend == "postgresql" else None
    server = mlflow_servers(uri)

    result = log_concurrently(server.url, PROCESSES, STEPS)

    assert result.errors == []
    assert result.expected == PROCESSES * STEPS * 3
    assert result.logged == result.counted == result.expected
    url = server.url
    server.restart()
    assert server.url == url
    assert count_back(url, result.run_ids) == result.expected
