"""
The cache directory that prepare.py fills and train.py reads: where each file lives, which corpus it holds
(data/source.json, so two corpora never mix in one cache), and PrepareError, the one-line error that says how
to fix a problem. Fixed, like prepare.py; the modules beside it build on this one and it imports none of them.
"""

import errno
import glob
import json
import os
import re
import shlex
from pathlib import Path

import pyarrow.parquet as pq

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "autoresearch")
VAL_SHARD = 6542                      # pinned validation shard: climbmix's last; a local corpus's takes its name too
VAL_FILENAME = f"shard_{VAL_SHARD:05d}.parquet"


class PrepareError(Exception):
    """A problem the user can fix (bad input, missing data); printed without a traceback."""


def describe_write_error(e, folder):
    """One line for an OSError met while writing under `folder`: what happened and how to fix it."""
    code = e.errno
    if code is None:  # pyarrow puts the errno in its message only
        found = re.search(r"errno (\d+)", str(e), flags=re.IGNORECASE)
        code = int(found.group(1)) if found else None
    where = "--cache-dir (or AUTORESEARCH_CACHE)"
    if code in (errno.ENOSPC, errno.EDQUOT):
        hint = f"The disk is full: free some space and rerun, or use another disk through {where}."
    elif code == errno.EROFS:
        hint = f"The disk is read-only: use a writable folder through {where}."
    elif code in (errno.EACCES, errno.EPERM):
        hint = f"No permission to write there: use a folder you own through {where}."
    elif code in (errno.ENOTDIR, errno.EEXIST):
        hint = f"{folder} or a folder above it is a file: name a folder (created if missing) through {where}."
    else:
        hint = f"Check the disk, or use another folder through {where}."
    reason = os.strerror(code) if code else str(e)
    return f"cannot write to {e.filename or folder}: {reason}. {hint}"


def cache_dir():
    return os.path.expanduser(os.environ.get("AUTORESEARCH_CACHE") or DEFAULT_CACHE_DIR)


def data_dir():
    return os.path.join(cache_dir(), "data")


def tokenizer_dir():
    return os.path.join(cache_dir(), "tokenizer")


def tokens_dir():
    return os.path.join(cache_dir(), "tokens")


def write_atomic(path, write_fn):
    """Write through a temp file and rename, so a crash never leaves a partial file under `path`."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def shard_path(index):
    return os.path.join(data_dir(), f"shard_{index:05d}.parquet")


def check_parquet(path):
    """Raise if `path` is not a readable parquet file with a text column (truncated downloads fail here)."""
    try:
        schema = pq.read_schema(path)
    except Exception as e:
        raise PrepareError(f"{path} is not a valid parquet file ({e}). Delete it and rerun prepare.py.") from e
    if "text" not in schema.names:
        raise PrepareError(f"{path} has no 'text' column (columns: {schema.names})")


def check_data_source(source):
    """Refuse to mix two corpora in one cache. Returns True if the cache already holds this one."""
    manifest = os.path.join(data_dir(), "source.json")
    if not os.path.exists(manifest):
        return False
    with open(manifest) as f:
        current = json.load(f)
    if current != source:
        raise PrepareError(
            f"the cache {cache_dir()} already holds another corpus ({current}).\n"
            "Use another --cache-dir (or AUTORESEARCH_CACHE), or rerun with --force to replace it.")
    return True


def claim_data_source(source):
    """Record which corpus the cache holds, once it holds all of it; refuse to mix two corpora in one cache."""
    if not check_data_source(source):
        write_atomic(os.path.join(data_dir(), "source.json"), lambda tmp: Path(tmp).write_text(json.dumps(source)))


def discard_unclaimed_shards():
    """Shards without a source.json are what an unfinished download left (a local corpus claims the cache
    before its shards take their final names): kept for a retry of that download, removed for another corpus."""
    if os.path.exists(os.path.join(data_dir(), "source.json")):
        return
    leftovers = glob.glob(os.path.join(data_dir(), "shard_*.parquet"))
    for path in leftovers:
        os.remove(path)
    if leftovers:
        print(f"Data: removed {len(leftovers)} shard(s) left in {data_dir()} by an unfinished download")


def list_shards(split):
    """Sorted shard paths of a split; a clear error if prepare.py has not run."""
    paths = sorted(glob.glob(os.path.join(data_dir(), "shard_*.parquet")))
    val_path = os.path.join(data_dir(), VAL_FILENAME)
    paths = [val_path] if split == "val" else [p for p in paths if p != val_path]
    if not paths or not os.path.exists(paths[0]):
        if not os.path.exists(os.path.join(data_dir(), "source.json")):
            raise PrepareError(f"no data in {cache_dir()}. Run: uv run prepare.py --cache-dir {shlex.quote(cache_dir())} "
                               "(or add --source sample offline)")
        missing = f"the validation shard {VAL_FILENAME} is" if split == "val" else "the training shards are"
        if data_source().get("source") == "local":
            raise PrepareError(f"{missing} missing from {data_dir()}. Import the corpus again: uv run prepare.py "
                               f"--source YOUR_CORPUS --cache-dir {shlex.quote(cache_dir())} --force")
        raise PrepareError(f"{missing} missing from {data_dir()}. Download it again: uv run prepare.py "
                           f"--cache-dir {shlex.quote(cache_dir())}")
    return paths


def data_source():
    try:
        with open(os.path.join(data_dir(), "source.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        raise PrepareError(f"no data in {cache_dir()}. Run: uv run prepare.py (or --source sample offline)") from None


def prepare_command():
    """The prepare.py command that completes this cache, keeping the data already in it."""
    command = f"uv run prepare.py --cache-dir {shlex.quote(cache_dir())}"
    try:
        if data_source().get("source") == "climbmix":
            return command.replace(" --cache-dir", f" --num-shards {len(list_shards('train'))} --cache-dir")
    except PrepareError:
        pass
    return command
