"""The real download code against a local HTTP server on 127.0.0.1 that the tests start themselves."""
import glob
import gzip
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data_cache
import prepare
from conftest import ROOT, SAMPLE


class ShardServer:
    """Serves parquet files from a folder. `fail[name] = n` answers the first n requests with 503;
    `truncate` names files whose transfer breaks off halfway."""

    def __init__(self, folder):
        self.folder, self.fail, self.truncate, self.requests = folder, {}, set(), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = os.path.basename(self.path)
                server.requests.append(name)
                path = os.path.join(server.folder, name)
                if server.fail.get(name, 0) > 0:
                    server.fail[name] -= 1
                    self.send_error(503)
                    return
                if not os.path.exists(path):
                    self.send_error(404)
                    return
                body = open(path, "rb").read()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2] if name in server.truncate else body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """Three climbmix-style shards (0, 1 and the pinned validation shard) cut from the sample corpus."""
    folder = tmp_path_factory.mktemp("remote")
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    for index, part in [(0, docs[0::3]), (1, docs[1::3]), (data_cache.VAL_SHARD, docs[2::3])]:
        pq.write_table(pa.table({"text": part}), folder / f"shard_{index:05d}.parquet")
    return str(folder)


@pytest.fixture
def server(remote):
    s = ShardServer(remote)
    yield s
    s.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path))
    return tmp_path


def names(cache):
    return sorted(os.listdir(cache / "data"))


def test_downloads_shards_and_skips_complete_files(server, cache):
    prepare.download_data(2, workers=3, base_url=server.url, backoff=0)
    assert names(cache) == ["shard_00000.parquet", "shard_00001.parquet", data_cache.VAL_FILENAME, "source.json"]
    for path in glob.glob(str(cache / "data" / "*.parquet")):
        assert pq.read_table(path).num_rows > 0
    first = len(server.requests)
    assert first == 3
    prepare.download_data(2, workers=3, base_url=server.url, backoff=0)
    assert len(server.requests) == first  # nothing fetched again


def test_failing_server_is_retried(server, cache):
    server.fail["shard_00000.parquet"] = 2
    prepare.download_data(1, base_url=server.url, retries=3, backoff=0.01)
    assert server.requests.count("shard_00000.parquet") == 3
    assert pq.read_table(cache / "data" / "shard_00000.parquet").num_rows > 0


def test_broken_transfer_never_leaves_a_file_under_its_final_name(server, cache):
    server.truncate.add("shard_00001.parquet")
    with pytest.raises(data_cache.PrepareError) as err:
        prepare.download_data(2, base_url=server.url, retries=2, backoff=0.01)
    assert "--source sample" in str(err.value) and "shard 1" in str(err.value)
    assert server.requests.count("shard_00001.parquet") == 2
    assert not os.path.exists(cache / "data" / "shard_00001.parquet")
    assert not [n for n in names(cache) if "tmp" in n]
    assert os.path.exists(cache / "data" / "shard_00000.parquet")  # the good ones are kept


def test_gives_up_after_retries_and_names_the_offline_option(server, cache):
    server.fail["shard_00000.parquet"] = 99
    with pytest.raises(data_cache.PrepareError, match="--source sample"):
        prepare.download_data(1, base_url=server.url, retries=2, backoff=0.01)
    assert server.requests.count("shard_00000.parquet") == 2


def test_command_line_download_then_tokenizer(server, tmp_path):
    env = {**os.environ, "AUTORESEARCH_DATA_URL": server.url}
    cmd = [sys.executable, os.path.join(ROOT, "prepare.py"), "--num-shards", "2", "--cache-dir", str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.path.exists(tmp_path / "tokenizer" / "tokenizer.tiktoken")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)  # second run: all cached
    assert result.returncode == 0 and "3/3 shards already" in result.stdout and "already trained" in result.stdout


def test_command_line_without_network_names_the_sample_option(tmp_path):
    env = {**os.environ, "AUTORESEARCH_DATA_URL": "http://127.0.0.1:9"}  # nothing listens on port 9
    # one try, no backoff: download_data passes its own retries and backoff on to download_shard
    code = ("import sys, prepare; prepare.download_data.__defaults__ = (8, None, 1, 0.0); "
            "sys.exit(prepare.main(['--num-shards', '1']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**env, "AUTORESEARCH_CACHE": str(tmp_path)})
    assert result.returncode == 1 and f"--source sample --cache-dir {tmp_path} " in result.stderr  # this cache
    assert not glob.glob(str(tmp_path / "data" / "*.parquet"))


def test_failed_download_leaves_the_cache_free_for_another_corpus(server, cache):
    server.fail["shard_00001.parquet"] = 99
    with pytest.raises(data_cache.PrepareError, match="--source sample"):
        prepare.download_data(2, base_url=server.url, retries=1, backoff=0)
    assert not os.path.exists(cache / "data" / "source.json")  # incomplete: climbmix does not claim the cache
    assert os.path.exists(cache / "data" / "shard_00000.parquet")  # kept for a retry of the same download
    # the offline option the error suggests is taken, and no climbmix shard is mixed into its data
    assert prepare.main(["--source", "sample", "--cache-dir", str(cache)]) == 0
    assert json.load(open(cache / "data" / "source.json"))["source"] == "local"
    texts = [t for path in data_cache.list_shards("train") for t in pq.read_table(path).column("text").to_pylist()]
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as f:
        sample = {json.loads(line)["text"] for line in f}
    assert texts and set(texts) <= sample


def test_retried_download_claims_the_cache_when_complete(server, cache):
    server.fail["shard_00001.parquet"] = 1
    with pytest.raises(data_cache.PrepareError):
        prepare.download_data(2, base_url=server.url, retries=1, backoff=0)
    prepare.download_data(2, base_url=server.url, retries=1, backoff=0)
    assert server.requests.count("shard_00000.parquet") == 1  # the finished shard was not fetched again
    assert json.load(open(cache / "data" / "source.json")) == {"source": "climbmix", "url": server.url}
