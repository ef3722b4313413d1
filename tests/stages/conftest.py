import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def test_modules(monkeypatch):
    """Make the test-only teacher modules importable here and in subprocesses."""
    monkeypatch.syspath_prepend(HERE)
    monkeypatch.setenv("PYTHONPATH", HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return HERE


# the offline builders of tiny Hugging Face models and tokenizers live beside the pipeline tests
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "pipeline"))
