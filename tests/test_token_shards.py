"""token_shards.py: both splits tokenized once by prepare.py and memory-mapped by its dataloader, their integrity
checks, and the start-up check of both splits. Offline."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import data_cache
import prepare
import token_shards
from conftest import ROOT, copy_cache, run_prepare, sample_docs, shard_texts


# --- token shards ---------------------------------------------------------------------------


def split_documents(split):
    """The split's documents as prepare.py tokenized them: one BOS-prefixed array each, in file order."""
    manifest = token_shards.check_token_shards()
    tokens, offsets, _ = token_shards.open_token_split(split, manifest)
    return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def test_token_shards_hold_each_split_tokenized_separately(use_cache):
    tok = prepare.Tokenizer.from_directory()
    bos = tok.get_bos_token_id()
    manifest = token_shards.check_token_shards(verify_contents=True)
    for split in ("train", "val"):
        texts = [t for path in data_cache.list_shards(split) for t in shard_texts(path)]
        docs = split_documents(split)
        assert len(docs) == len(texts) == manifest["splits"][split]["documents"]
        assert all(d.dtype == np.uint16 and list(d) == tok.encode(t, prepend=bos) for d, t in zip(docs, texts))
        assert manifest["splits"][split]["shards"] == [[os.path.basename(p), os.path.getsize(p)]
                                                       for p in data_cache.list_shards(split)]
    # the validation loader reads only validation documents, and the training loader only training ones
    val_docs = {tuple(d) for d in split_documents("val")}
    train_docs = {tuple(d) for d in split_documents("train")}
    assert not val_docs & train_docs
    x, y, _ = next(prepare.make_dataloader(tok, 2, 256, "val"))
    row = np.concatenate([np.array(x[0]), np.array(y[0, -1:])])
    first = row[:np.flatnonzero(row == bos)[1]] if (row == bos).sum() > 1 else row
    assert any(tuple(d[:len(first)]) == tuple(first) for d in val_docs)


def test_tokenizing_is_the_same_with_one_or_several_processes(tmp_path, prepared_cache):
    one, two = copy_cache(prepared_cache, tmp_path / "one"), copy_cache(prepared_cache, tmp_path / "two")
    for cache, workers in [(one, "1 process"), (two, "2 processes")]:
        shutil.rmtree(cache / "tokens")
        result = run_prepare("--cache-dir", str(cache), "--tokenize-workers", workers.split()[0])
        assert result.returncode == 0, result.stderr
        assert f"with {workers} (" in result.stdout
    for name in ("train.bin", "train.idx.npy", "val.bin", "val.idx.npy", "manifest.json"):
        assert (one / "tokens" / name).read_bytes() == (two / "tokens" / name).read_bytes()
    assert (one / "tokens" / "train.bin").read_bytes() == (Path(prepared_cache) / "tokens" / "train.bin").read_bytes()


def old_path_batches(tokenizer, split, seed):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import loader_speed
    return loader_speed.on_the_fly_batches(tokenizer, split, seed, cache_limit=0, threads=2)


@pytest.mark.parametrize("split,batches", [("train", 300), ("val", 500)])
def test_packing_equals_the_old_tokenize_on_the_fly_path(use_cache, split, batches):
    # rows of 257 tokens, a buffer of 50 documents: the seeded order matters, and val runs into its 2nd epoch
    tok = prepare.Tokenizer.from_directory()
    manifest = token_shards.check_token_shards()
    split_tokens = token_shards.open_token_split(split, manifest)
    new = prepare.packed_rows(prepare.document_batches(*split_tokens, split == "train", 7), 2, 256, 50)
    old = prepare.packed_rows(old_path_batches(tok, split, 7), 2, 256, 50)
    epochs = set()
    for _ in range(batches):
        (a, epoch_a), (b, epoch_b) = next(new), next(old)
        assert (a == b).all() and epoch_a == epoch_b
        epochs.add(epoch_a)
    assert epochs == {1} if split == "train" else {1, 2} <= epochs


def test_dataloader_is_deterministic_across_processes(use_cache):
    code = ("import hashlib, numpy as np, prepare; tok = prepare.Tokenizer.from_directory(); "
            "loader = prepare.make_dataloader(tok, 4, 512, 'train', seed=3); "
            "print(hashlib.sha256(b''.join(np.array(next(loader)[0]).tobytes() for _ in range(20))).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
               for _ in range(2)}
    assert len(digests) == 1

# --- integrity: another tokenizer or corpus, an old cache, damaged files ----------------------------------


def swap_two_ranks(cache):
    """Another tokenizer with the same vocabulary size: two merge ranks exchanged."""
    path = cache / "tokenizer" / "tokenizer.tiktoken"
    lines = path.read_text().splitlines()
    (a, ra), (b, rb) = lines[300].split(), lines[301].split()
    lines[300], lines[301] = f"{a} {rb}", f"{b} {ra}"
    path.write_text("\n".join(lines) + "\n")
    token_bytes = np.load(cache / "tokenizer" / "token_bytes.npy")  # kept consistent with the ranks
    token_bytes[[int(ra), int(rb)]] = token_bytes[[int(rb), int(ra)]]
    np.save(cache / "tokenizer" / "token_bytes.npy", token_bytes)


def drop_last_training_document(cache):
    path = cache / "data" / "shard_00000.parquet"
    pq.write_table(pq.read_table(path).slice(0, pq.read_metadata(path).num_rows - 1), path, row_group_size=1024)


@pytest.mark.parametrize("damage,message", [
    (lambda c: shutil.rmtree(c / "tokens"), "no token shards"),
    (lambda c: os.remove(c / "tokens" / "manifest.json"), "no token shards"),
    (swap_two_ranks, "another tokenizer"),
    (drop_last_training_document, "train shards in"),
    (lambda c: (c / "tokens" / "val.bin").write_bytes((c / "tokens" / "val.bin").read_bytes()[:-2]), "truncated"),
    (lambda c: os.remove(c / "tokens" / "val.bin"), "val.bin is missing"),
])
def test_stale_or_missing_token_shards_name_the_command_that_fixes_them(tmp_path, prepared_cache, monkeypatch,
                                                                         damage, message):
    cache = copy_cache(prepared_cache, tmp_path / "cache")
    damage(cache)
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    tok = prepare.Tokenizer.from_directory()
    with pytest.raises(data_cache.PrepareError, match=message) as err:
        prepare.make_dataloader(tok, 2, 128, "train")  # at the call, before any batch is asked for
    command = f"uv run prepare.py --cache-dir {cache}"
    assert command in str(err.value) and "\n" not in str(err.value)
    result = run_prepare(*command.split()[3:])  # the command it names repairs the cache
    assert result.returncode == 0, result.stderr
    assert "Tokens: " in result.stdout and "up to date" not in result.stdout
    next(prepare.make_dataloader(prepare.Tokenizer.from_directory(), 2, 128, "train"))


def test_another_corpus_in_the_cache_invalidates_the_token_shards(tmp_path, prepared_cache, monkeypatch):
    cache = copy_cache(prepared_cache, tmp_path / "cache")
    manifest = json.loads((cache / "tokens" / "manifest.json").read_text())
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": d}) + "\n" for d in sample_docs()[::-1]))
    assert run_prepare("--source", str(other), "--cache-dir", str(cache), "--force").returncode == 0
    fresh = json.loads((cache / "tokens" / "manifest.json").read_text())
    assert fresh["source"] != manifest["source"] and fresh["tokenizer"] != manifest["tokenizer"]
    # the old manifest put back over the new corpus: refused, not silently used
    (cache / "tokens" / "manifest.json").write_text(json.dumps({**manifest, "tokenizer": fresh["tokenizer"]}))
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    with pytest.raises(data_cache.PrepareError, match="another corpus"):
        prepare.make_dataloader(prepare.Tokenizer.from_directory(), 2, 128, "val")


def test_prepare_rerun_finds_corrupt_token_files_by_checksum(tmp_path, prepared_cache):
    cache = copy_cache(prepared_cache, tmp_path / "cache")
    assert "Tokens: up to date" in run_prepare("--cache-dir", str(cache)).stdout
    data = bytearray((cache / "tokens" / "train.bin").read_bytes())
    data[1000] ^= 1  # same size: only the checksum sees it
    (cache / "tokens" / "train.bin").write_bytes(bytes(data))
    result = run_prepare("--cache-dir", str(cache))
    assert result.returncode == 0 and "up to date" not in result.stdout
    assert (cache / "tokens" / "train.bin").read_bytes() == (Path(prepared_cache) / "tokens" / "train.bin").read_bytes()

def test_unreadable_shard_while_tokenizing_is_one_line(tmp_path, prepared_cache):
    cache = copy_cache(prepared_cache, tmp_path / "cache")
    shard = cache / "data" / "shard_00000.parquet"
    data = bytearray(shard.read_bytes())
    data[1000:len(data) // 2] = bytes(len(data) // 2 - 1000)  # the data pages, not the footer
    shard.write_bytes(bytes(data))
    shutil.rmtree(cache / "tokens")
    result = run_prepare("--cache-dir", str(cache))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"cannot read shard {shard}" in result.stderr
    assert not (cache / "tokens" / "manifest.json").exists()


# --- a missing split is found at start-up --------------------------------------------------------


def test_missing_validation_shard_stops_the_training_loader_at_once(tmp_path, prepared_cache, monkeypatch):
    cache = copy_cache(prepared_cache, tmp_path / "cache")
    os.remove(cache / "data" / data_cache.VAL_FILENAME)
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    with pytest.raises(data_cache.PrepareError, match=f"validation shard {data_cache.VAL_FILENAME} is missing") as err:
        prepare.make_dataloader(prepare.Tokenizer.from_directory(), 2, 128, "train")
    assert "--source YOUR_CORPUS" in str(err.value) and "--force" in str(err.value)


@pytest.mark.slow
def test_train_py_stops_before_training_without_a_validation_split(tmp_path, prepared_cache):
    cache = copy_cache(prepared_cache, tmp_path / "cache")
    os.remove(cache / "data" / data_cache.VAL_FILENAME)
    env = {**os.environ, "AUTORESEARCH_CACHE": str(cache), "AUTORESEARCH_TIME_BUDGET": "120"}
    t0 = time.time()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode != 0 and time.time() - t0 < 120
    assert not re.search(r"^step ", result.stdout, flags=re.M) and "Traceback" not in result.stderr
    assert f"validation shard {data_cache.VAL_FILENAME} is missing" in result.stderr, result.stderr
