"""
Token shards: prepare.py tokenizes each split once (every document BOS-prefixed) into a flat token file and its
document offsets, and the dataloader memory-maps them. A manifest written last records what they were made from
(tokenizer files, corpus shards) and each file's size and sha256, so stale or damaged token shards are refused
with the command that remakes them. Fixed, like prepare.py.
"""

import collections
import hashlib
import itertools
import json
import multiprocessing
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from data_cache import (PrepareError, cache_dir, data_dir, data_source, list_shards, prepare_command, tokenizer_dir,
                        tokens_dir, write_atomic)

TOKEN_DTYPE = np.uint16   # every id is below VOCAB_SIZE = 8192 (prepare.py asserts it): 2 bytes a token on disk
TOKENS_FORMAT = 1         # bump when the layout below changes: older token shards are then made again

# tokens/{split}.bin        the split's documents, each BOS-prefixed, back to back (TOKEN_DTYPE)
# tokens/{split}.idx.npy    int64 offsets: document d is bin[idx[d]:idx[d + 1]]
# tokens/manifest.json      what they were made from (tokenizer, corpus shards) and each file's size and sha256;
#                           written last, so its presence marks complete token shards


def tokenizer_fingerprint():
    """sha256 over the tokenizer's files: token shards made with any other tokenizer are refused."""
    digest = hashlib.sha256()
    try:
        for name in sorted(n for n in os.listdir(tokenizer_dir()) if ".tmp-" not in n):
            with open(os.path.join(tokenizer_dir(), name), "rb") as f:
                digest.update(name.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    except OSError as e:
        raise PrepareError(f"cannot read the tokenizer in {tokenizer_dir()} ({e}). Run: {prepare_command()}") from None
    return digest.hexdigest()


def split_identity(split):
    """Name and size of every corpus shard of a split: token shards of other shards are refused."""
    return [[os.path.basename(p), os.path.getsize(p)] for p in list_shards(split)]


def _file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def walled_off(split):
    """Whether the split's files read as empty devices: the harness's sandbox hides the validation split from
    training runs (autoresearch/sandbox.py)."""
    paths = list_shards(split) + [os.path.join(tokens_dir(), f"{split}{ext}") for ext in (".bin", ".idx.npy")]
    return any(os.path.exists(p) and not os.path.isfile(p) for p in paths)


def check_token_shards(verify_contents=False, splits=("train", "val"), min_val_tokens=0):
    """The token manifest, if the splits' token shards exist and match this cache's corpus and tokenizer (sizes
    checked; contents too with `verify_contents`) and the validation split holds `min_val_tokens` (prepare.py's
    row: one evaluation row needs that many; read from the manifest, so a training run need not see the split).
    Otherwise a PrepareError that names the command to run."""
    for split in splits:
        list_shards(split)  # a missing split is named as such
    rerun = f"Run: {prepare_command()}"
    try:
        with open(os.path.join(tokens_dir(), "manifest.json")) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise PrepareError(f"the cache {cache_dir()} has no token shards (it was prepared by an older prepare.py, or "
                           f"tokenizing did not finish). Tokenize it once: {prepare_command()}") from None
    except (OSError, ValueError) as e:
        raise PrepareError(f"the token manifest in {tokens_dir()} is unreadable ({e}). {rerun}") from None
    if manifest.get("format") != TOKENS_FORMAT or manifest.get("dtype") != np.dtype(TOKEN_DTYPE).name:
        raise PrepareError(f"the token shards in {tokens_dir()} have an older layout. {rerun}")
    if manifest.get("tokenizer") != tokenizer_fingerprint():
        raise PrepareError(f"the token shards in {tokens_dir()} were made with another tokenizer. {rerun}")
    if manifest.get("source") != data_source():
        raise PrepareError(f"the token shards in {tokens_dir()} were made from another corpus. {rerun}")
    for split in splits:
        if walled_off(split):
            continue  # the harness's evaluation checks it, by hash, before it scores
        entry, now = manifest.get("splits", {}).get(split, {}), split_identity(split)
        if entry.get("shards") != now:
            changed = sorted({name for name, _ in now} ^ {name for name, _ in entry.get("shards", [])}
                             or {name for name, size in now if [name, size] not in entry.get("shards", [])})
            raise PrepareError(f"the {split} shards in {data_dir()} changed since they were tokenized "
                               f"({', '.join(changed)}). {rerun}")
        for name, expected in entry.get("files", {}).items():
            path = os.path.join(tokens_dir(), name)
            if not os.path.exists(path) or os.path.getsize(path) != expected["bytes"]:
                raise PrepareError(f"the token file {path} is missing or truncated. {rerun}")
            if verify_contents and _file_sha256(path) != expected["sha256"]:
                raise PrepareError(f"the token file {path} is corrupt (sha256 differs). {rerun}")
    # the manifest's count, not val.bin: found before training, not by evaluate_bpb once the budget is spent
    val_tokens = manifest["splits"]["val"].get("tokens", 0)
    if val_tokens < min_val_tokens:
        raise PrepareError(f"the validation split in {data_dir()} holds {val_tokens:,} tokens, less than one row of "
                           f"{min_val_tokens:,}: val_bpb can't be measured. Prepare a bigger corpus: uv run prepare.py "
                           f"--source PATH --cache-dir {shlex.quote(cache_dir())} --force")
    return manifest


_worker_tokenizer = None  # each tokenizing process loads its own


def _load_worker_tokenizer(load_tokenizer):
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer()


def _tokenize_row_group(unit):
    """(concatenated BOS-prefixed tokens, document lengths) of one parquet row group, in a worker process."""
    path, row_group = unit
    try:
        texts = pq.ParquetFile(path).read_row_group(row_group, columns=["text"]).column(0).to_pylist()
    except Exception as e:  # handed to prepare.py's main process as one line
        raise PrepareError(f"cannot read shard {path} ({type(e).__name__}: {e}). Delete it and rerun prepare.py.") from None
    docs = _worker_tokenizer.encode(texts, prepend=_worker_tokenizer.get_bos_token_id(), num_threads=1)
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    tokens = np.fromiter(itertools.chain.from_iterable(docs), dtype=TOKEN_DTYPE, count=int(lengths.sum()))
    return tokens, lengths


def _in_order(pool, fn, items, ahead):
    """pool.imap with at most `ahead` results waiting: memory stays bounded when one item is slow."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _tokenize_split(split, pool, workers):
    """Write tokens/{split}.bin and .idx.npy; returns the split's manifest entry."""
    from tqdm import tqdm

    units, n_docs = [], 0
    for path in list_shards(split):
        try:
            metadata = pq.ParquetFile(path).metadata
        except Exception as e:
            raise PrepareError(f"cannot read shard {path} ({type(e).__name__}: {e}). Delete it and rerun prepare.py.") from None
        units += [(path, g) for g in range(metadata.num_row_groups)]
        n_docs += metadata.num_rows
    bin_path, idx_path = (os.path.join(tokens_dir(), f"{split}{ext}") for ext in (".bin", ".idx.npy"))
    unit_docs, lengths = [], [np.zeros(1, np.int64)]

    def write_tokens(tmp):
        with open(tmp, "wb") as f, tqdm(total=n_docs, desc=f"Tokenizing {split}", unit="doc", unit_scale=True) as bar:
            for tokens, doc_lengths in _in_order(pool, _tokenize_row_group, units, ahead=2 * workers):
                f.write(tokens.tobytes())
                lengths.append(doc_lengths)
                unit_docs.append(len(doc_lengths))
                bar.update(len(doc_lengths))

    def write_offsets(tmp):
        with open(tmp, "wb") as f:
            np.save(f, np.cumsum(np.concatenate(lengths)))
    write_atomic(bin_path, write_tokens)
    write_atomic(idx_path, write_offsets)
    files = {os.path.basename(p): {"bytes": os.path.getsize(p), "sha256": _file_sha256(p)} for p in (bin_path, idx_path)}
    return {"shards": split_identity(split), "documents": sum(unit_docs), "unit_documents": unit_docs,
            "tokens": files[f"{split}.bin"]["bytes"] // np.dtype(TOKEN_DTYPE).itemsize, "files": files}


def tokenize_corpus(load_tokenizer, workers=None):
    """Tokenize both splits once into token shards (every document BOS-prefixed, as the dataloader packs them),
    in parallel processes, unless token shards for this corpus and tokenizer are already there and intact.
    `load_tokenizer()` returns the cache's trained tokenizer (prepare.Tokenizer.from_directory); each process
    calls it once."""
    try:
        manifest = check_token_shards(verify_contents=True)
        print(f"Tokens: up to date in {tokens_dir()} ({manifest['splits']['train']['tokens']:,} train, "
              f"{manifest['splits']['val']['tokens']:,} val)")
        return
    except PrepareError:
        pass
    workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    os.makedirs(tokens_dir(), exist_ok=True)
    manifest_path = os.path.join(tokens_dir(), "manifest.json")
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # from here until the new one is written, the token shards are incomplete
    manifest = {"format": TOKENS_FORMAT, "dtype": np.dtype(TOKEN_DTYPE).name, "tokenizer": tokenizer_fingerprint(),
                "source": data_source(), "bos": load_tokenizer().get_bos_token_id(), "splits": {}}
    t0 = time.time()
    # fork on Linux: workers start at once, without importing MLX again; macOS can't fork safely after Metal starts
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(workers, initializer=_load_worker_tokenizer, initargs=(load_tokenizer,)) as pool:
        for split in ("val", "train"):
            manifest["splits"][split] = _tokenize_split(split, pool, workers)
    write_atomic(manifest_path, lambda tmp: Path(tmp).write_text(json.dumps(manifest)))
    n_tokens = sum(s["tokens"] for s in manifest["splits"].values())
    n_bytes = sum(f["bytes"] for s in manifest["splits"].values() for f in s["files"].values())
    seconds = time.time() - t0
    print(f"Tokens: {manifest['splits']['train']['tokens']:,} train + {manifest['splits']['val']['tokens']:,} val "
          f"in {seconds:.1f}s with {workers} process{'es' if workers > 1 else ''} ({n_tokens / seconds / 1e6:.2f} M tok/s), "
          f"{n_bytes / 1e6:,.1f} MB in {tokens_dir()}")


def open_token_split(split, manifest):
    """(tokens, document offsets, first document of each row group) of a split; the tokens stay on disk."""
    entry = manifest["splits"][split]
    tokens = np.memmap(os.path.join(tokens_dir(), f"{split}.bin"), dtype=TOKEN_DTYPE, mode="r")
    offsets = np.load(os.path.join(tokens_dir(), f"{split}.idx.npy"))
    unit_starts = np.concatenate([[0], np.cumsum(entry["unit_documents"])]).astype(np.int64)
    if len(offsets) != unit_starts[-1] + 1 or offsets[-1] != len(tokens):
        raise PrepareError(f"the token files of the {split} split in {tokens_dir()} disagree. Run: {prepare_command()}")
    return np.asarray(tokens), offsets, unit_starts
