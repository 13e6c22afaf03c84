import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "data", "sample.jsonl.gz")
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def prepared_cache(tmp_path_factory):
    """A cache with the bundled sample corpus and its trained tokenizer, made once per test session
    through prepare.py's real command line."""
    cache = str(tmp_path_factory.mktemp("cache"))
    subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "--source", "sample", "--cache-dir", cache],
                   check=True, capture_output=True, text=True)
    return cache


@pytest.fixture
def use_cache(prepared_cache, monkeypatch):
    """Point prepare.py's runtime helpers at the prepared cache."""
    monkeypatch.setenv("AUTORESEARCH_CACHE", prepared_cache)
    return prepared_cache
