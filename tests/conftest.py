import gzip
import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "data", "sample.jsonl.gz")
sys.path.insert(0, ROOT)


def run_prepare(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def sample_docs(n=None):
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    return docs[:n] if n else docs


def shard_texts(path):
    return pq.read_table(path).column("text").to_pylist()


def copy_cache(src, dst):
    shutil.copytree(src, dst)
    return dst


def cache_files(cache):
    """Every file under a cache folder (a pathlib.Path), by relative path, with its bytes."""
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


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
