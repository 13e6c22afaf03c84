"""
The user's own corpus (prepare.py --source): a .txt / .jsonl / .parquet file or a folder of text files (source
trees too) read as documents, split deterministically into training shards and a held-out validation shard in
the climbmix shard layout, so everything after this step treats both corpora alike. Fixed, like prepare.py.
"""

import glob
import gzip
import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from data_cache import PrepareError, VAL_SHARD, check_parquet, claim_data_source, data_dir, shard_path, write_atomic

SAMPLE_CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sample.jsonl.gz")
LOCAL_VAL_EVERY = 10                  # every 10th document is held out for validation...
LOCAL_VAL_MAX_CHARS = 20_000_000      # ...until the validation shard holds this much text
LOCAL_SHARD_CHARS = 250_000_000       # text per training shard

CORPUS_SUFFIXES = (".txt", ".jsonl", ".parquet", ".txt.gz", ".jsonl.gz")
# Folders (source trees included): every other file is one document, unless it is skipped for a reason below.
# The cap keeps out generated data: in the Linux 6.12 tree, the 321 files over 256 KB (0.4 % of its files) are
# mostly AMD GPU register headers and hold 35 % of its bytes; packing uses at most a row (~8 KB) of any document.
MAX_FILE_BYTES = 256 * 1024
SKIPPED_FOLDERS = {".git", ".hg", ".svn", ".bzr", "CVS", "__pycache__", "node_modules", ".venv", ".tox",
                   ".mypy_cache", ".pytest_cache", ".ipynb_checkpoints"}
NAMED_SKIPS = 5  # skipped files named in prepare.py's output, per reason


def _open_text(path):
    opener = gzip.open if path.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8", errors="strict")


def _txt_documents(text):
    return [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]


def read_documents(path, skipped=None):
    """Yield the documents of a .txt (blank-line separated), .jsonl ("text" field) or .parquet ("text" column)
    file, or of a folder: its files in sorted order of their relative paths, those formats read as such and any
    other text file as one document. Folder files that are binary, not UTF-8, symlinks or over MAX_FILE_BYTES,
    and SKIPPED_FOLDERS, are left out and recorded in `skipped` (reason -> relative paths)."""
    if os.path.isdir(path):
        skipped = {} if skipped is None else skipped
        files = folder_files(path, skipped)
        with ThreadPoolExecutor(max_workers=4) as pool:  # reads ahead while the caller hashes and writes
            for i in range(0, len(files), 256):
                chunk = files[i:i + 256]
                for rel, text in zip(chunk, pool.map(lambda rel: _read_folder_file(path, rel), chunk)):
                    if isinstance(text, str):
                        yield from (_txt_documents(text) if rel.endswith(".txt") else [text] if text.strip() else [])
                    elif text is None:
                        yield from read_documents(os.path.join(path, rel))  # a corpus file: read as such
                    else:
                        skipped.setdefault(text[0], []).append(rel)
        return
    if not os.path.exists(path):
        raise PrepareError(f"corpus not found: {path}")
    try:
        if path.endswith(".parquet"):
            check_parquet(path)
            for batch in pq.ParquetFile(path).iter_batches(columns=["text"]):
                yield from (t for t in batch.column(0).to_pylist() if t)
        elif path.endswith((".jsonl", ".jsonl.gz")):
            with _open_text(path) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise PrepareError(f"{path}:{lineno}: expected a JSON object with a \"text\" field ({e})") from e
                    if not isinstance(text, str):
                        raise PrepareError(f"{path}:{lineno}: \"text\" must be a string")
                    if text.strip():
                        yield text
        elif path.endswith((".txt", ".txt.gz")):
            with _open_text(path) as f:
                yield from _txt_documents(f.read())
        else:
            raise PrepareError(f"unsupported corpus file {path}: use one of {', '.join(CORPUS_SUFFIXES)}, "
                               "or a folder of text files")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path} is not UTF-8 text ({e}). Convert it, e.g. iconv -t UTF-8.") from e
    except (OSError, EOFError) as e:
        raise PrepareError(f"cannot read {path}: {e}") from e


def folder_files(folder, skipped):
    """Sorted relative paths of the regular files under `folder` worth reading; what is left out goes to `skipped`."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):  # never enters symlinked folders
        rel_dir = os.path.relpath(dirpath, folder)
        for name in sorted(dirnames):
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if name in SKIPPED_FOLDERS:
                skipped.setdefault("VCS/tooling folders", []).append(rel + "/")
                dirnames.remove(name)
            elif os.path.islink(os.path.join(dirpath, name)):
                skipped.setdefault("symlinks", []).append(rel)
        for name in filenames:
            rel, full = os.path.normpath(os.path.join(rel_dir, name)), os.path.join(dirpath, name)
            if os.path.islink(full):
                skipped.setdefault("symlinks", []).append(rel)
            elif not os.path.isfile(full):
                skipped.setdefault("not regular files", []).append(rel)
            elif not name.endswith(CORPUS_SUFFIXES) and os.path.getsize(full) > MAX_FILE_BYTES:
                skipped.setdefault(f"over {MAX_FILE_BYTES // 1024} KB", []).append(rel)
            else:
                found.append(rel)
    return sorted(found, key=lambda rel: rel.replace(os.sep, "/"))


def _read_folder_file(folder, rel):
    """The text of a folder's plain (or .txt) file, None for another corpus format, or (reason,) if skipped."""
    if rel.endswith(CORPUS_SUFFIXES) and not rel.endswith(".txt"):
        return None
    try:
        with open(os.path.join(folder, rel), "rb") as f:
            data = f.read()
    except OSError as e:
        return (f"unreadable ({e.strerror})",)
    if b"\0" in data:
        return ("binary (NUL bytes)",)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return ("not UTF-8",)


def report_skipped(skipped):
    """How many files were left out for each reason, naming the first few."""
    if skipped:
        print(f"Skipped {sum(map(len, skipped.values())):,} files or folders:")
    for reason, paths in sorted(skipped.items()):
        paths = sorted(paths)
        more = f", ... ({len(paths) - NAMED_SKIPS:,} more)" if len(paths) > NAMED_SKIPS else ""
        print(f"  {len(paths):,} {reason}: {', '.join(paths[:NAMED_SKIPS])}{more}")


def _write_shard(path, docs):
    write_atomic(path, lambda tmp: pq.write_table(pa.table({"text": docs}), tmp, row_group_size=1024))


def import_local_corpus(source):
    """Split a local corpus into training shards and a held-out validation shard (every
    LOCAL_VAL_EVERY-th document, up to LOCAL_VAL_MAX_CHARS): deterministic for a given corpus. An unreadable or
    too small corpus leaves no shard behind. (--force imports into an empty staging cache: prepare.py.)"""
    path = SAMPLE_CORPUS if source == "sample" else os.path.abspath(os.path.expanduser(source))
    digest = hashlib.sha256()
    train, val, val_chars, shard_chars, shard_index, n_docs = [], [], 0, 0, 0, 0
    staged = []  # shards are written under temporary names, renamed only when the corpus read cleanly
    skipped = {}
    t0 = time.time()
    os.makedirs(data_dir(), exist_ok=True)
    try:
        for i, doc in enumerate(read_documents(path, skipped)):
            n_docs += 1
            digest.update(hashlib.sha256(doc.encode("utf-8")).digest())
            if i % LOCAL_VAL_EVERY == 0 and val_chars < LOCAL_VAL_MAX_CHARS:
                val.append(doc)
                val_chars += len(doc)
                continue
            train.append(doc)
            shard_chars += len(doc)
            if shard_chars >= LOCAL_SHARD_CHARS:
                staged.append((shard_index, len(train)))  # counts only: a big corpus must not stay in memory
                _write_shard(shard_path(shard_index) + ".staged", train)
                train, shard_chars, shard_index = [], 0, shard_index + 1
        if train:
            staged.append((shard_index, len(train)))
            _write_shard(shard_path(shard_index) + ".staged", train)
        if not staged or not val:
            left_out = "".join(f", {len(paths)} {reason}" for reason, paths in sorted(skipped.items()))
            raise PrepareError(f"corpus {path} is too small: {n_docs} non-empty document(s){left_out and ' (skipped' + left_out[1:] + ')'}; "
                               "need at least 2 (one for training, one for validation), and in practice a few MB of text")
        claim_data_source({"source": "local", "sha256": digest.hexdigest()})  # content, not path: caches can move
        _write_shard(shard_path(VAL_SHARD), val)
        for index, _ in staged:
            os.replace(shard_path(index) + ".staged", shard_path(index))
    finally:
        for leftover in glob.glob(os.path.join(data_dir(), "*.staged")):
            os.remove(leftover)
    n_train = sum(n for _, n in staged)
    print(f"Data: {n_docs:,} documents from {path} in {time.time() - t0:.1f}s: {n_train:,} for training in "
          f"{len(staged)} shard(s), {len(val):,} held out for validation ({val_chars:,} chars)")
    report_skipped(skipped)
