import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)

# helpers of the other test folders: storehelp (stores), slowteacher (slow models), modelhelp (models, pickles)
for folder in ("storage", "stages", "pipeline"):
    sys.path.insert(0, os.path.join(TESTS, folder))


@pytest.fixture
def helper_env(monkeypatch):
    """Environment for subprocesses that import the helpers (faults.py, slowteacher, modelhelp)."""
    paths = [HERE, *(os.path.join(TESTS, f) for f in ("stages", "pipeline"))]
    env = dict(os.environ, OMP_NUM_THREADS="1", DISTILL_LOG_EVERY="3600")
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for p in paths:
        monkeypatch.syspath_prepend(p)
    return env
