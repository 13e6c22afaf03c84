"""prepare.py: tokenizer, dataloader, evaluate_bpb, its command line and bad input. Offline."""
import base64
import dataclasses
import errno
import glob
import json
import math
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data_cache
import local_corpus
import prepare
import token_shards
from conftest import ROOT, cache_files, copy_cache, run_prepare, sample_docs, shard_texts


# --- tokenizer ----------------------------------------------------------------


def test_tokenizer_round_trip_and_vocab(use_cache):
    tok = prepare.Tokenizer.from_directory()
    assert tok.get_vocab_size() == prepare.VOCAB_SIZE
    assert tok.get_bos_token_id() == prepare.VOCAB_SIZE - 1
    for text in ["Hello world!", "  leading spaces\n\ttabs", "Unicode: héllo 你好 🙂", "numbers 1234567", ""]:
        assert tok.decode(tok.encode(text)) == text
    batch = tok.encode(["a b", "c d"], prepend=tok.get_bos_token_id())
    assert all(row[0] == tok.get_bos_token_id() for row in batch)


def test_token_bytes_match_tokens(use_cache):
    tok = prepare.Tokenizer.from_directory()
    token_bytes = np.array(prepare.get_token_bytes())
    assert token_bytes.shape == (prepare.VOCAB_SIZE,)
    for i in range(prepare.VOCAB_SIZE - 1):
        assert token_bytes[i] == len(tok.enc.decode_single_token_bytes(i))
    assert token_bytes[tok.get_bos_token_id()] == 0
    assert token_bytes[:256].min() == 1  # every single byte is a token

def test_preparing_a_cache_again_with_another_corpus_gives_the_new_tokenizer(tmp_path, monkeypatch):
    # tiktoken's loader caches a ranks file by its path: the second preparation used to load the first's ranks
    other = tmp_path / "upper.jsonl"
    other.write_text("".join(json.dumps({"text": d.upper()}) + "\n" for d in sample_docs()))
    cache = tmp_path / "cache"
    assert run_prepare("--source", "sample", "--cache-dir", str(cache)).returncode == 0
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    first = prepare.Tokenizer.from_directory()
    assert run_prepare("--source", str(other), "--cache-dir", str(cache), "--force").returncode == 0
    tok = prepare.Tokenizer.from_directory()
    lines = (cache / "tokenizer" / "tokenizer.tiktoken").read_text().split("\n")
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}
    assert all(tok.enc.decode_single_token_bytes(rank) == token for token, rank in ranks.items())
    assert tok.encode("THE KING") != first.encode("THE KING")
    token_bytes = np.array(prepare.get_token_bytes())
    assert all(token_bytes[i] == len(tok.enc.decode_single_token_bytes(i)) for i in range(prepare.VOCAB_SIZE - 1))


# --- dataloader ---------------------------------------------------------------


def split_at_bos(row, bos):
    starts = list(np.flatnonzero(row == bos)) + [len(row)]
    return [row[a:b] for a, b in zip(starts, starts[1:])]


def test_dataloader_rows_are_packed_real_documents(use_cache):
    tok = prepare.Tokenizer.from_directory()
    bos = tok.get_bos_token_id()
    docs = {}
    for ids in tok.encode(shard_texts(data_cache.list_shards("train")[0]), prepend=bos):
        for k in (1, 2, 3):  # index by short prefixes: a cropped segment may be very short
            docs.setdefault(tuple(ids[:k]), []).append(ids)
    loader = prepare.make_dataloader(tok, 4, 512, "train")
    for _ in range(3):
        x, y, epoch = next(loader)
        assert x.shape == y.shape == (4, 512) and x.dtype == mx.int32
        x, y = np.array(x), np.array(y)
        assert (x[:, 1:] == y[:, :-1]).all()
        assert (x[:, 0] == bos).all()
        for row in np.concatenate([x, y[:, -1:]], axis=1):  # the full T+1 row
            segments = split_at_bos(row, bos)
            assert sum(len(s) for s in segments) == 513  # no padding: the row is all document tokens
            for k, seg in enumerate(segments):
                candidates = docs[tuple(seg[:3])]
                assert any(list(seg) == d[:len(seg)] for d in candidates), "a token not from a real document"
                if k < len(segments) - 1:  # only the row's last document may be cropped
                    assert any(len(seg) == len(d) for d in candidates)


def test_dataloader_deterministic_for_a_seed(use_cache):
    tok = prepare.Tokenizer.from_directory()

    def first_batches(split, seed):  # a buffer smaller than the corpus, so the seeded order matters
        loader = prepare.make_dataloader(tok, 2, 256, split, seed=seed, buffer_size=50)
        return [np.array(next(loader)[0]) for _ in range(3)]
    a, b, c = first_batches("train", 1), first_batches("train", 1), first_batches("train", 2)
    assert all((p == q).all() for p, q in zip(a, b))
    assert not all((p == q).all() for p, q in zip(a, c))
    # validation never depends on the seed
    assert all((p == q).all() for p, q in zip(first_batches("val", 1), first_batches("val", 2)))

def test_dataloader_thread_ends_with_its_consumer(use_cache):
    import threading
    import time
    tok = prepare.Tokenizer.from_directory()
    loader = prepare.make_dataloader(tok, 2, 128, "train")
    next(loader)
    loader.close()
    deadline = time.time() + 5
    while any(t.name.startswith("dataloader") for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.name.startswith("dataloader") for t in threading.enumerate())


# --- evaluate_bpb -----------------------------------------------------------------


class UniformModel:
    """Logits of zeros: every token costs ln(V) nats. Records how many rows each call gets."""

    def __init__(self):
        self.calls = []

    def __call__(self, x):
        self.calls.append(x.shape[0])
        return mx.zeros((*x.shape, prepare.VOCAB_SIZE))


def test_evaluate_bpb_uniform_logits_is_log2_vocab_per_token(use_cache, monkeypatch):
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 4 * 4 * prepare.MAX_SEQ_LEN)
    monkeypatch.setattr(prepare, "EVAL_CHUNK_TOKENS", 2 * prepare.MAX_SEQ_LEN)
    tok = prepare.Tokenizer.from_directory()
    token_bytes = np.array(prepare.get_token_bytes())
    loader = prepare.make_dataloader(tok, 4, prepare.MAX_SEQ_LEN, "val")
    tokens = nbytes = 0
    for _ in range(4):
        _, y, epoch = next(loader)
        assert epoch == 1
        b = token_bytes[np.array(y)]
        tokens += int((b > 0).sum())
        nbytes += int(b.sum())
    model = UniformModel()
    bpb, evaluated = prepare.evaluate_bpb(model, tok, 4)
    assert bpb == pytest.approx(math.log2(prepare.VOCAB_SIZE) * tokens / nbytes, rel=1e-6)
    assert evaluated == 16 * prepare.MAX_SEQ_LEN
    # called in chunks, never on the whole batch; every chunk twice (the causality check)
    assert max(model.calls) == 2 and sum(model.calls) == 2 * 16


class LowRankModel:
    """Fixed random logits from a token's embedding; a loss API that lies (every token costs 0 nats)."""

    def __init__(self, dtype=mx.float32):
        rng = np.random.default_rng(0)
        self.embed = rng.standard_normal((prepare.VOCAB_SIZE, 8)).astype(np.float32)
        self.unembed = 2 * rng.standard_normal((8, prepare.VOCAB_SIZE)).astype(np.float32)
        self.dtype = dtype

    def logits(self, x):
        return mx.array(self.embed)[x] @ mx.array(self.unembed)

    def __call__(self, x, targets=None, reduction="mean"):
        if targets is not None:
            return mx.zeros(targets.shape)
        return self.logits(x).astype(self.dtype)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_evaluate_bpb_scores_the_logits_itself(use_cache, monkeypatch, dtype):
    # the metric comes from the model's logits, computed in float32 here, not from a loss train.py could change
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 3 * prepare.MAX_SEQ_LEN)
    tok = prepare.Tokenizer.from_directory()
    model = LowRankModel(dtype)
    bpb, evaluated = prepare.evaluate_bpb(model, tok, 2)
    x, y, _ = next(prepare.make_dataloader(tok, 3, prepare.MAX_SEQ_LEN, "val"))
    logits = np.array(model.logits(x).astype(dtype).astype(mx.float32)).astype(np.float64)
    y = np.array(y)
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nats = -np.take_along_axis(log_probs, y[..., None], -1)[..., 0]
    nbytes = np.array(prepare.get_token_bytes())[y]
    assert evaluated == 3 * prepare.MAX_SEQ_LEN
    assert bpb == pytest.approx(nats[nbytes > 0].sum() / (math.log(2) * nbytes.sum()), rel=1e-5)


def small_validation_split(cache, n_docs, max_chars=None):
    """Keep only the first n_docs documents of the cache's validation shard (cut to max_chars); returns
    its token count."""
    path = cache / "data" / data_cache.VAL_FILENAME
    docs = [doc[:max_chars] for doc in shard_texts(path)[:n_docs]]
    pq.write_table(pa.table({"text": docs}), path)
    # the token shards follow the corpus, as after prepare.py
    token_shards.tokenize_corpus(prepare.Tokenizer.from_directory, workers=1)
    return sum(len(ids) for ids in prepare.Tokenizer.from_directory().encode(docs, prepend=0))


def test_evaluate_bpb_never_counts_a_token_twice(tmp_path, prepared_cache, monkeypatch, capsys):
    # a split smaller than one evaluation batch used to be read round again within that first batch
    cache = copy_cache(prepared_cache, tmp_path / "cache")
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    val_tokens = small_validation_split(cache, 6, max_chars=8000)
    assert 2 * prepare.MAX_SEQ_LEN < val_tokens < 8 * prepare.MAX_SEQ_LEN
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 8 * prepare.MAX_SEQ_LEN)
    tok = prepare.Tokenizer.from_directory()
    seen = []

    def model(x):
        seen.append(np.array(x))
        return mx.zeros((*x.shape, prepare.VOCAB_SIZE))
    _, evaluated = prepare.evaluate_bpb(model, tok, 8)
    assert {s.shape for s in seen} <= set(prepare.eval_shapes(8))  # the shapes scoring.py exports the model for
    rows = np.concatenate([seen[0], *seen[2:]])  # seen[1]: the causality check's changed copy of the first batch
    rows = rows[~(rows == tok.get_bos_token_id()).all(axis=1)]  # the short last call's padding
    assert evaluated == rows.size < val_tokens
    # every evaluated row is a new stretch of the split: no row repeats another's documents
    starts = {tuple(row[:64]) for row in rows}
    assert len(starts) == len(rows)
    # the message gives the count evaluated, in whole rows, not the split's length (it holds more: rows crop)
    out = capsys.readouterr().out
    assert f"fills only {len(rows)} rows of {prepare.MAX_SEQ_LEN}: {evaluated:,} tokens evaluated, fewer than" in out


def test_evaluate_bpb_refuses_a_split_shorter_than_a_row(tmp_path, prepared_cache, monkeypatch):
    cache = copy_cache(prepared_cache, tmp_path / "cache")
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    assert small_validation_split(cache, 1, max_chars=2000) <= prepare.MAX_SEQ_LEN
    with pytest.raises(data_cache.PrepareError, match="validation split"):
        prepare.evaluate_bpb(UniformModel(), prepare.Tokenizer.from_directory(), 8)


def test_a_validation_split_shorter_than_a_row_stops_training_at_start_up(tmp_path, prepared_cache, monkeypatch):
    cache = copy_cache(prepared_cache, tmp_path / "cache")
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    assert small_validation_split(cache, 1, max_chars=2000) <= prepare.MAX_SEQ_LEN
    tok = prepare.Tokenizer.from_directory()
    real_open = open

    def no_validation_tokens(path, *args, **kwargs):  # the check reads the manifest's count, never val.bin
        assert not os.path.basename(str(path)).startswith("val."), path
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr("builtins.open", no_validation_tokens)
    with pytest.raises(data_cache.PrepareError, match="validation split") as err:
        prepare.make_dataloader(tok, 2, 128, "train")  # at start-up, before any batch
    monkeypatch.undo()
    assert "--force" in str(err.value) and "\n" not in str(err.value)
    # prepare.py names the same fault, rather than "Done."
    result = run_prepare("--cache-dir", str(cache))
    assert result.returncode == 1 and "validation split" in result.stderr and "Done." not in result.stdout


def test_prepare_refuses_a_corpus_whose_validation_split_is_shorter_than_a_row(tmp_path):
    # every 10th document goes to validation: make those tiny, the rest (the sample) trains the tokenizer
    docs = [f"note {i}." if i % local_corpus.LOCAL_VAL_EVERY == 0 else d for i, d in enumerate(sample_docs())]
    path = tmp_path / "skewed.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    result = run_prepare("--source", str(path), "--cache-dir", str(tmp_path / "cache"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "validation split" in errors[0] and "bigger corpus" in errors[0], result.stderr
    assert "--force" in errors[0] and "Done." not in result.stdout


class TinyAttention:
    """One attention layer over random embeddings; `leak`: None (causal), "no mask" (attention sees every
    position) or "next token" (position t also reads the token at t + 1)."""

    def __init__(self, leak=None, dtype=mx.float32, dim=16):
        rng = np.random.default_rng(1)
        w = lambda *shape: mx.array(rng.standard_normal(shape).astype(np.float32) / math.sqrt(dim))  # noqa: E731
        self.embed = math.sqrt(dim) * w(prepare.VOCAB_SIZE, dim)
        self.wq, self.wk, self.wv, self.unembed = w(dim, dim), w(dim, dim), w(dim, dim), w(dim, prepare.VOCAB_SIZE)
        self.leak, self.dtype = leak, dtype

    def __call__(self, x):
        h = self.embed.astype(self.dtype)[x]
        if self.leak == "next token":
            h = h + self.embed.astype(self.dtype)[mx.roll(x, -1, axis=1)]
        q, k, v = (mx.expand_dims(h @ w.astype(self.dtype), 1) for w in (self.wq, self.wk, self.wv))
        mask = None if self.leak == "no mask" else "causal"
        a = mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask)
        return (h + a.squeeze(1)) @ self.unembed.astype(self.dtype)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_evaluate_bpb_passes_a_causal_model(use_cache, monkeypatch, dtype):
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 4 * prepare.MAX_SEQ_LEN)
    bpb, evaluated = prepare.evaluate_bpb(TinyAttention(None, dtype), prepare.Tokenizer.from_directory(), 2)
    assert math.isfinite(bpb) and evaluated == 4 * prepare.MAX_SEQ_LEN


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("leak", ["no mask", "next token"])
def test_evaluate_bpb_refuses_a_model_that_sees_the_future(use_cache, monkeypatch, leak, dtype):
    # a lost causal mask or a shifted input would score a wonderful, meaningless val_bpb: the run must crash
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 4 * prepare.MAX_SEQ_LEN)
    # the cuts are random; a next-token leak shows at the cut itself
    match = (r"logits at position \d+ of row \d changed .* the model sees the future" if leak == "no mask" else
             r"logits at position (\d+) of row \d changed .* after position \1 changed: the model sees the future")
    with pytest.raises(ValueError, match=match):
        prepare.evaluate_bpb(TinyAttention(leak, dtype), prepare.Tokenizer.from_directory(), 2)


# --- the command line ---------------------------------------------------------


def test_ready_message_names_the_cache(tmp_path):
    cache = tmp_path / "my cache"
    result = run_prepare("--source", "sample", "--cache-dir", str(cache))
    assert result.returncode == 0, result.stderr
    command = result.stdout.strip().splitlines()[-1].split("Ready to train: ", 1)[1]
    assert command == f"AUTORESEARCH_CACHE='{cache}' uv run train.py"
    # the printed command is what a shell runs: its AUTORESEARCH_CACHE points at this cache
    env = subprocess.run(["sh", "-c", command.replace("uv run train.py", "env")], capture_output=True, text=True)
    assert f"AUTORESEARCH_CACHE={cache}\n" in env.stdout


# --- --force: the new corpus is built beside the cache and swapped in only once every step succeeded -----------


def beside(cache):
    """What --force may leave next to the cache: its staging folder (<cache>.new-PID) or the old cache (.old-PID)."""
    return sorted(name for name in os.listdir(cache.parent) if name.startswith(cache.name + "."))


def plant_kernels(cache):
    """Compiled kernel caches (training's and the harness's evaluation's), and a folder prepare.py doesn't know."""
    planted = {"mlx-kernels/0.0/gpu/k.ptx": b"training kernel", "eval-kernels/0.0/gpu/k.ptx": b"evaluation kernel",
               "notes/mine.txt": b"not the corpus's, not a kernel"}
    for rel, content in planted.items():
        (cache / rel).parent.mkdir(parents=True, exist_ok=True)
        (cache / rel).write_bytes(content)
    return planted


def too_small_for_the_tokenizer(path):
    # 300 short, distinct documents: the import takes them, but BPE runs out of merges long before 8192 tokens
    path.write_text("\n\n".join(f"note {i}: the cat sat on mat number {i}." for i in range(300)))


def validation_shorter_than_a_row(path):
    # every 10th document goes to validation: tiny ones; the rest (the sample) trains the tokenizer
    docs = [f"note {i}." if i % local_corpus.LOCAL_VAL_EVERY == 0 else d for i, d in enumerate(sample_docs())]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


@pytest.mark.parametrize("name,write,step_done,message", [
    ("few.txt", too_small_for_the_tokenizer, "Data: 300 documents", "too small for a 8192-token vocabulary"),
    ("skewed.jsonl", validation_shorter_than_a_row, "Tokens: ", "less than one row of 2,049"),
], ids=["tokenizer", "validation"])
def test_a_force_that_fails_after_the_import_leaves_the_old_cache_as_it_was(tmp_path, prepared_cache, name, write,
                                                                             step_done, message):
    cache = copy_cache(prepared_cache, tmp_path / "cache")
    plant_kernels(cache)
    before = cache_files(cache)
    write(tmp_path / name)
    result = run_prepare("--source", str(tmp_path / name), "--cache-dir", str(cache), "--force")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert step_done in result.stdout, result.stdout  # the new corpus got past the import: the fault came later
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and f"The cache {cache} is left as it was." in errors[0]
    assert ".new-" not in result.stderr  # commands and paths name the cache, not the staging folder (removed)
    assert "replaced" not in result.stdout and "Done." not in result.stdout
    assert cache_files(cache) == before  # every file byte-identical, kernels and the unknown folder included
    assert beside(cache) == []
    again = run_prepare("--cache-dir", str(cache))  # the old corpus is still ready to train on
    assert again.returncode == 0 and "Tokens: up to date" in again.stdout, again.stderr


def test_force_swaps_in_the_new_corpus_and_keeps_the_compiled_kernels(tmp_path, prepared_cache):
    cache = copy_cache(prepared_cache, tmp_path / "cache")
    planted = plant_kernels(cache)
    old_source = (cache / "data" / "source.json").read_text()
    other = tmp_path / "reversed.jsonl"
    other.write_text("".join(json.dumps({"text": d}) + "\n" for d in sample_docs()[::-1]))
    result = run_prepare("--source", str(other), "--cache-dir", str(cache), "--force")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    replaced = [i for i, line in enumerate(lines) if line == f"Cache: the new corpus replaced the old one in {cache}"]
    tokens = [i for i, line in enumerate(lines) if line.startswith("Tokens: ")]
    assert len(replaced) == 1 and tokens and tokens[-1] < replaced[0] < len(lines) - 1  # after every step, before Done
    assert ".new-" not in result.stdout.split("Cache: the new corpus", 1)[1]  # from the swap on: the cache's paths
    assert (cache / "data" / "source.json").read_text() != old_source
    files = cache_files(cache)
    assert {rel: files.get(rel) for rel in planted if "kernels" in rel} == {
        rel: content for rel, content in planted.items() if "kernels" in rel}
    assert not (cache / "notes").exists()  # went with the old cache
    assert beside(cache) == []
    again = run_prepare("--source", str(other), "--cache-dir", str(cache))  # the new corpus, complete
    assert again.returncode == 0 and "Tokens: up to date" in again.stdout, again.stderr


@pytest.mark.parametrize("fault", ["ctrl-c", "full disk"])
def test_a_force_stopped_while_tokenizing_leaves_the_old_cache_as_it_was(tmp_path, prepared_cache, monkeypatch, capsys,
                                                                         fault):
    cache = copy_cache(prepared_cache, tmp_path / "cache")
    plant_kernels(cache)
    before = cache_files(cache)
    other = tmp_path / "reversed.jsonl"
    other.write_text("".join(json.dumps({"text": d}) + "\n" for d in sample_docs()[::-1]))
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    seen = []

    def stopped(*args, **kwargs):  # while tokenizing, after the new tokenizer was trained
        seen.append(data_cache.cache_dir())
        assert os.path.exists(os.path.join(data_cache.tokenizer_dir(), "tokenizer.json"))
        if fault == "ctrl-c":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(data_cache.tokens_dir(), "train.bin"))
    monkeypatch.setattr(prepare, "tokenize_corpus", stopped)
    argv = ["--source", str(other), "--cache-dir", str(cache), "--force"]
    if fault == "ctrl-c":
        with pytest.raises(KeyboardInterrupt):
            prepare.main(argv)
    else:
        assert prepare.main(argv) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "disk is full" in errors[0] and f"The cache {cache} is left as it was." in errors[0]
    assert seen == [f"{cache}.new-{os.getpid()}"]  # built in the staging folder beside the cache
    assert cache_files(cache) == before and beside(cache) == []
    assert data_cache.cache_dir() == str(cache)


def test_a_failed_force_download_leaves_the_old_cache_as_it_was(tmp_path, prepared_cache):
    # --force without --source replaces the local corpus with climbmix: here the download fails
    cache = copy_cache(prepared_cache, tmp_path / "cache")
    before = cache_files(cache)
    code = ("import sys, prepare; prepare.download_data.__defaults__ = (8, None, 1, 0); "  # one try, no backoff
            "sys.exit(prepare.main(['--num-shards', '1', '--force']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "AUTORESEARCH_CACHE": str(cache),
                                 "AUTORESEARCH_DATA_URL": "http://127.0.0.1:9"})  # nothing listens on port 9
    assert result.returncode == 1 and "failed to download" in result.stderr, result.stderr
    assert f"--source sample --cache-dir {cache} " in result.stderr and ".new-" not in result.stderr
    assert cache_files(cache) == before and beside(cache) == []


# --- bad input: a clear error, a non-zero exit, nothing half-written ----------------


def test_missing_corpus_and_missing_data(tmp_path):
    result = run_prepare("--source", str(tmp_path / "nope.txt"), "--cache-dir", str(tmp_path / "c"))
    assert result.returncode == 1 and "not found" in result.stderr
    # train.py's view of an empty cache: the error says to run prepare.py
    code = "import prepare; prepare.Tokenizer.from_directory()"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "AUTORESEARCH_CACHE": str(tmp_path / "empty")})
    assert result.returncode == 1 and "prepare.py" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("code,message", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only"),
                                          (errno.EACCES, "No permission")])
def test_disk_errors_are_one_line(tmp_path, monkeypatch, capsys, code, message):
    # the disk refuses a write once the shards are read: os-level errors and pyarrow's (errno in the text only)
    real_write_atomic = local_corpus.write_atomic

    def refuse(tmp):
        raise OSError(code, os.strerror(code), tmp) if code != errno.ENOSPC else OSError(
            f"[Errno {code}] Error writing bytes to file. Detail: [errno {code}] {os.strerror(code)}")
    monkeypatch.setattr(local_corpus, "write_atomic", lambda path, write_fn: real_write_atomic(
        path, lambda tmp: (write_fn(tmp), refuse(tmp))))
    cache = tmp_path / "cache"
    assert prepare.main(["--source", "sample", "--cache-dir", str(cache)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and "--cache-dir" in err
    assert not [p for p in glob.glob(str(cache / "**" / "*"), recursive=True) if os.path.isfile(p)]


def test_cache_dir_that_is_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    result = run_prepare("--source", "sample", "--cache-dir", str(afile))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "is a file" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert afile.read_text() == "not a folder"


def test_too_small_for_the_vocabulary(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i} hello"}) + "\n" for i in range(30)))
    result = run_prepare("--source", str(path), "--cache-dir", str(tmp_path / "c"))
    assert result.returncode == 1 and "too small" in result.stderr
    assert not os.path.exists(tmp_path / "c" / "tokenizer" / "tokenizer.json")


@pytest.mark.parametrize("damage,message", [
    (lambda c: os.remove(c / "tokenizer" / "tokenizer.tiktoken"), "missing"),
    (lambda c: (c / "tokenizer" / "tokenizer.tiktoken").write_text("garbage\n"), "corrupt"),
    (lambda c: (c / "tokenizer" / "tokenizer.json").write_text("{"), "corrupt"),
    (lambda c: np.save(c / "tokenizer" / "token_bytes.npy", np.zeros(10, np.int32)), "does not match"),
    (lambda c: np.save(c / "tokenizer" / "token_bytes.npy",  # right size, another tokenizer's lengths
                       np.roll(np.load(c / "tokenizer" / "token_bytes.npy"), 1)), "token_bytes.npy"),
    (lambda c: (c / "data" / "source.json").write_text('{"source": "other"}'), "another corpus"),
])
def test_damaged_tokenizer(tmp_path, prepared_cache, monkeypatch, damage, message):
    cache = copy_cache(prepared_cache, tmp_path / "cache")
    damage(cache)
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    with pytest.raises(data_cache.PrepareError, match=message) as err:
        prepare.Tokenizer.from_directory()
    assert "prepare.py" in str(err.value)


def test_rerunning_prepare_repairs_a_corrupt_tokenizer(tmp_path, prepared_cache, monkeypatch):
    cache = copy_cache(prepared_cache, tmp_path / "cache")
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    good = prepare.Tokenizer.from_directory()  # loaded once while intact (tiktoken's loader cached it then)
    ranks_file = cache / "tokenizer" / "tokenizer.tiktoken"
    ranks_file.write_text(ranks_file.read_text()[:5000])  # cut short, as by a full disk
    result = run_prepare("--source", "sample", "--cache-dir", str(cache))
    assert result.returncode == 0, result.stderr
    assert "already trained" not in result.stdout
    assert prepare.Tokenizer.from_directory().encode("Hello world") == good.encode("Hello world")


def test_corrupt_shard(tmp_path, prepared_cache, monkeypatch):
    cache = copy_cache(prepared_cache, tmp_path / "cache")
    (cache / "data" / "shard_00000.parquet").write_bytes(b"PAR1 not really")
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    tok = prepare.Tokenizer.from_directory()
    with pytest.raises(data_cache.PrepareError, match="shard_00000"):
        next(prepare.make_dataloader(tok, 2, 128, "train"))

# --- hardware: fast CPU BLAS, CUDA kernel cache ---------------------------------------


@pytest.mark.parametrize("setting", ["1", "0"])
def test_fast_blas_loader(setting):
    code = ("import prepare, mlx.core as mx, numpy as np\n"
            "a = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)\n"
            "err = np.abs(np.array(mx.array(a) @ mx.array(a)) - a.astype(np.float64) @ a).max()\n"
            "print(prepare.FAST_BLAS, err)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "AUTORESEARCH_FAST_BLAS": setting})
    assert result.returncode == 0, result.stderr
    lib, err = result.stdout.split()
    assert float(err) < 1e-3  # matmuls stay right whichever BLAS serves them
    have_openblas = "libopenblas" in subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    if setting == "0" or prepare.HARDWARE.backend != "cpu":
        assert lib == "None"
    elif have_openblas:
        assert "openblas" in lib
    else:
        assert "no fast BLAS" in result.stderr


def test_cuda_kernel_cache_lives_beside_the_data(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path))
    monkeypatch.delenv("MLX_PTX_CACHE_DIR", raising=False)
    prepare.keep_kernel_cache(dataclasses.replace(prepare.HARDWARE, backend="cpu"))
    assert "MLX_PTX_CACHE_DIR" not in os.environ  # only MLX's CUDA backend compiles kernels at run time
    gpu = dataclasses.replace(prepare.HARDWARE, backend="cuda", device_name="NVIDIA H100 80GB HBM3")
    prepare.keep_kernel_cache(gpu)
    assert os.environ["MLX_PTX_CACHE_DIR"] == str(tmp_path / "mlx-kernels" / mx.__version__ / "NVIDIA-H100-80GB-HBM3")
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", "/somewhere/else")
    prepare.keep_kernel_cache(gpu)
    assert os.environ["MLX_PTX_CACHE_DIR"] == "/somewhere/else"  # the user's choice stands

# --- layout: the modules prepare.py builds on ------------------------------------------


def test_modules_beside_prepare_import_neither_it_nor_mlx():
    # imports read bottom-up (no cycle), and prepare.py can import them before it picks the CPU BLAS for MLX
    code = ("import sys, data_cache, local_corpus, token_shards\n"
            "print(sorted(name for name in ('prepare', 'mlx', 'mlx.core') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _peeking(x, bonus=30.0, skip=(), big=None):
    """Logits that favour each position's next input token: the target. `skip`: positions left honest; `big`: one
    huge logit, as a model that would blow the tolerance up."""
    rows, seq = x.shape
    following = mx.concatenate([x[:, 1:], x[:, -1:]], axis=1)
    logits = bonus * (mx.arange(prepare.VOCAB_SIZE)[None, None, :] == following[..., None]).astype(mx.float32)
    if skip:
        honest = mx.array([t in skip for t in range(seq)])[None, :, None]
        logits = mx.where(honest, 0.0, logits)
    if big is not None:
        logits = mx.where((mx.arange(seq) == seq - 2)[None, :, None] & (mx.arange(prepare.VOCAB_SIZE) == 5), big, logits)
    return logits


@pytest.mark.parametrize("how", ["everywhere", "except the old fixed cuts", "with a huge logit elsewhere",
                                 "rows reading each other"])
def test_the_causality_check_catches_a_model_that_reads_its_targets(use_cache, monkeypatch, how):
    # found by a red-team trial: the check ran on the first call only, at fixed cuts, with a tolerance that grew
    # with the largest logit. Now: every call, random cuts, real-text replacements, a bounded tolerance
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 4 * prepare.MAX_SEQ_LEN)
    seq = prepare.MAX_SEQ_LEN
    model = {"everywhere": _peeking,
             "except the old fixed cuts": lambda x: _peeking(x, skip={(r + 1) * seq // 3 for r in range(2)}),
             "with a huge logit elsewhere": lambda x: _peeking(x, big=900.0),
             "rows reading each other": lambda x: _peeking(mx.concatenate([x[1:], x[:1]]))}[how]
    with pytest.raises(ValueError, match="sees the future"):
        prepare.evaluate_bpb(model, prepare.Tokenizer.from_directory(), 2)
    with pytest.raises(ValueError, match="not finite or above"):
        prepare.evaluate_bpb(lambda x: _peeking(x, big=1e6), prepare.Tokenizer.from_directory(), 2)
