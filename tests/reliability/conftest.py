import builtins
import errno
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


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A directory nothing can be written into (as root, where modes do not bind, writes there fail with EACCES)."""
    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o555)
    if os.geteuid() == 0:
        def refuse(real):
            def call(p, *args, **kwargs):
                mode = args[0] if args else kwargs.get("mode", "r")
                writing = real is not builtins.open or any(c in str(mode) for c in "wax+")
                if writing and str(os.fspath(p)).startswith(str(path)):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))
                return real(p, *args, **kwargs)
            return call

        monkeypatch.setattr(os, "mkdir", refuse(os.mkdir))
        monkeypatch.setattr(builtins, "open", refuse(builtins.open))
    yield path
    path.chmod(0o755)
