"""
Constants, the climbmix download, tokenizer, dataloader, the fixed metric and the hardware profile for
autoresearch-mlx. Run once before training; train.py imports its runtime half. The rest lives in fixed modules
beside it, which import nothing from here (none is ever edited by the agent, nor is this file):
    data_cache.py      the cache directory's layout, which corpus it holds, PrepareError
    local_corpus.py    --source: your own file or folder split into training and validation shards
    token_shards.py    both splits tokenized once, the manifest that checks them, memory-mapped reading
    fused_ops.py       the ops train.py imports (CUDA kernels on NVIDIA, MLX ops elsewhere)

Usage:
    uv run prepare.py                     # download climbmix shards, train the tokenizer, tokenize once
    uv run prepare.py --num-shards 8      # fewer training shards (the validation shard is pinned)
    uv run prepare.py --source sample     # the bundled public-domain corpus, no internet needed
    uv run prepare.py --source PATH       # your own .txt / .jsonl / .parquet file, or a folder (source trees too)
    uv run prepare.py --source PATH --force  # replace the cache's corpus: built beside it, swapped in once ready
    uv run prepare.py --cache-dir DIR     # where everything lives (or AUTORESEARCH_CACHE)

Everything lives in the cache directory (default ~/.cache/autoresearch); docs/data.md has the details:
    data/shard_NNNNN.parquet   training shards ("text" column); data/shard_06542.parquet is validation
    data/source.json           which corpus the shards came from
    tokenizer/                 tokenizer.tiktoken (BPE ranks), tokenizer.json (meta), token_bytes.npy
    tokens/                    both splits tokenized once (train.bin, val.bin, their .idx.npy, manifest.json)
"""

import argparse
import base64
import ctypes
import ctypes.util
import glob
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import queue
import re
import shlex
import shutil
import sys
import threading
import time
from bisect import bisect_right
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from data_cache import (DEFAULT_CACHE_DIR, VAL_SHARD, PrepareError, cache_dir, check_data_source, check_parquet,
                        claim_data_source, data_dir, data_source, describe_write_error,
                        discard_unclaimed_shards, list_shards, prepare_command, shard_path, tokenizer_dir,
                        tokens_dir, write_atomic)
from local_corpus import import_local_corpus
from token_shards import TOKEN_DTYPE, check_token_shards, open_token_split, tokenize_corpus, walled_off

# ---------------------------------------------------------------------------
# Constants (fixed: the metric depends on them)
# ---------------------------------------------------------------------------

MAX_SEQ_LEN = 2048          # context length of training rows and of evaluation
TIME_BUDGET = 300           # training seconds per experiment
EVAL_TOKENS = 3 * 524288    # validation tokens for val_bpb (fewer on CPU: evaluation within ~10 % of the budget)
VOCAB_SIZE = 8192           # BPE vocabulary, special tokens included

BASE_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
MAX_SHARD = VAL_SHARD                 # the last climbmix shard (shard_06542.parquet) is the pinned validation shard

# GPT-4 style split, with numbers split into 1-2 digit groups (a small vocab wastes fewer slots on numbers)
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
BOS_TOKEN = "<|bos|>"
SPECIAL_TOKENS = [BOS_TOKEN]

TOKENIZER_MAX_CHARS = 2_000_000_000   # text used to train the tokenizer
TOKENIZER_DOC_CAP = 10_000            # chars taken from any one document for tokenizer training
LOADER_PREFETCH = 4                   # batches packed ahead by the dataloader's background thread
EVAL_CHUNK_TOKENS = 32 * MAX_SEQ_LEN  # tokens per model call in evaluate_bpb: bounds the logits' memory
UNTIMED_STEPS = 2                     # steps before train.py's training clock starts: they compile the graphs
assert VOCAB_SIZE <= np.iinfo(TOKEN_DTYPE).max + 1  # every token id fits the token shards' dtype

# Tests and smoke runs only: shorten the experiment without editing this file (the run prints what it used).
TIME_BUDGET = float(os.environ.get("AUTORESEARCH_TIME_BUDGET", TIME_BUDGET))
SEED = int(os.environ.get("AUTORESEARCH_SEED", 42))  # the harness varies it to measure noise
if TIME_BUDGET <= 0:
    sys.exit(f"AUTORESEARCH_TIME_BUDGET must be a positive number of seconds, got {TIME_BUDGET}")


def _report_prepare_error(exc_type, exc, tb, default_hook=sys.excepthook):
    """Uncaught PrepareErrors (in train.py too) print as one clear line, not a traceback."""
    if issubclass(exc_type, PrepareError):
        print(f"error: {exc}", file=sys.stderr)
    else:
        default_hook(exc_type, exc, tb)


sys.excepthook = _report_prepare_error


# ---------------------------------------------------------------------------
# Hardware profile: every hardware-specific choice lives here
# ---------------------------------------------------------------------------

def _installed(dist):
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _fast_blas_candidates():
    # AUTORESEARCH_FAST_BLAS=/path/to/lib picks one explicitly.
    choice = os.environ.get("AUTORESEARCH_FAST_BLAS", "")
    if os.sep in choice:
        return [choice]
    # Distro OpenBLAS first: 43 MB, and as fast as MKL or faster in our measurements (Debian/Ubuntu:
    # apt install libopenblas0-pthread). Fedora's threaded build is openblasp, its plain one is serial.
    found = [ctypes.util.find_library(name) for name in ("openblasp", "openblas")]
    # Intel's `mkl` wheel (opt-in dependency group) drops libmkl_rt into the environment's lib/.
    found += sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so.*")), reverse=True)
    return [path for path in found if path]


def _mlx_cpu_build():
    """True when MLX's Linux CPU build is installed and no CUDA build is (decided without importing mlx)."""
    return _installed("mlx-cpu") and not (_installed("mlx-cuda-13") or _installed("mlx-cuda-12"))


def load_fast_cpu_blas():
    """Make MLX's CPU matmuls use a fast BLAS; returns the library's path, or None.

    MLX's Linux CPU wheel links netlib's reference BLAS (~5 GFLOP/s against ~100-200 for OpenBLAS).
    libmlx.so looks up cblas_sgemm & co. in the global symbol scope before its own bundled libblas,
    so a library loaded with RTLD_GLOBAL before mlx is imported takes those calls over. Python binds
    extension symbols at load time (RTLD_NOW), so this does nothing once mlx.core is imported.
    """
    if os.environ.get("AUTORESEARCH_FAST_BLAS", "1") == "0" or sys.platform != "linux":
        return None
    # Metal and CUDA builds do their matmuls on the GPU. Decided from package metadata, as importing
    # mlx to ask for its default device would make the load below too late.
    if not _mlx_cpu_build():
        return None
    if "mlx.core" in sys.modules:
        print("fast BLAS: not loaded, mlx.core was imported first (import prepare before mlx)")
        return None
    for path in _fast_blas_candidates():
        try:
            # Load privately first: a library without the CBLAS entry points must not be made global.
            if not hasattr(ctypes.CDLL(path), "cblas_sgemm"):
                continue
            ctypes.CDLL(path, mode=os.RTLD_GLOBAL)  # promotes the already-loaded library to global scope
        except OSError:
            continue
        return path  # describe_hardware() names it; AUTORESEARCH_FAST_BLAS=0 turns this off
    print("warning: no fast BLAS found, so MLX's CPU matmuls use its slow reference BLAS (~10x slower "
          "training). On Debian/Ubuntu: sudo apt install libopenblas0-pthread", file=sys.stderr)
    return None


def keep_freed_memory_in_heap():
    """MLX's CPU backend allocates with malloc, and glibc maps every block over 32 MB fresh from the OS and
    unmaps it on free, so each new (batch, seq, vocab) float32 buffer costs ~65k page faults. Keeping such
    blocks in the heap made big elementwise ops ~7x faster and a CPU training step ~13% faster here."""
    if sys.platform != "linux" or not _mlx_cpu_build():
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-4, 0)            # M_MMAP_MAX: never serve malloc with mmap
        libc.mallopt(-1, 2**31 - 1)    # M_TRIM_THRESHOLD: keep freed memory for the next step
    except (OSError, AttributeError):
        pass  # not glibc


# MLX's CPU and CUDA builds ship the same mlx/lib/libmlx.so, so whichever was installed last is the one loaded,
# and uninstalling either deletes the other's file too (hence --reinstall-package in the fixes). `uv sync`
# installs the CPU build (default group `cpu`); UV_NO_GROUP=cpu keeps every later `uv run`/`uv sync` from
# adding it back on an NVIDIA machine. Every command sequence is measured in docs/install.md.
CUDA_INSTALL = "export UV_NO_GROUP=cpu && uv sync --extra cuda --reinstall-package mlx-cuda-13"
CPU_INSTALL = "uv sync --reinstall-package mlx-cpu"
NVIDIA_GPU_MARKERS = ("/proc/driver/nvidia/version", "/dev/nvidia0")


def nvidia_gpu_present():
    return any(os.path.exists(path) for path in NVIDIA_GPU_MARKERS) or shutil.which("nvidia-smi") is not None


def mlx_library_present():
    spec = importlib.util.find_spec("mlx")
    folders = spec.submodule_search_locations if spec else []
    return any(os.path.exists(os.path.join(folder, "lib", "libmlx.so")) for folder in folders)


def mlx_build_problem(nvidia_gpu, installed, library_present=True, system=sys.platform):
    """(fatal, one line naming the fix) when the installed MLX builds don't fit this Linux machine, else None.
    Decided without importing mlx (importing it without its library fails with an obscure ImportError)."""
    if system != "linux":
        return None  # macOS: plain mlx carries Metal
    cuda = "mlx-cuda-13" in installed or "mlx-cuda-12" in installed
    cpu = "mlx-cpu" in installed
    fix = CUDA_INSTALL if nvidia_gpu else CPU_INSTALL
    if not (cuda or cpu) or not library_present:
        return True, f"error: MLX's library (mlx/lib/libmlx.so) is not installed. Fix: {fix}"
    if cuda and cpu:
        return False, (f"warning: MLX's CPU and CUDA builds are both installed and share one library file, so the "
                       f"last installed wins (a plain `uv run` adds the CPU build back). Fix: {fix}")
    if nvidia_gpu and not cuda:
        return False, (f"warning: this machine has an NVIDIA GPU but MLX's CPU build is installed, so training runs "
                       f"on the CPU. Fix: {fix}")
    return None


def check_mlx_build():
    installed = [name for name in ("mlx-cpu", "mlx-cuda-13", "mlx-cuda-12") if _installed(name)]
    problem = mlx_build_problem(nvidia_gpu_present(), installed, mlx_library_present())
    if problem:
        fatal, line = problem
        print(line, file=sys.stderr)
        if fatal:
            sys.exit(2)


check_mlx_build()
FAST_BLAS = load_fast_cpu_blas()
keep_freed_memory_in_heap()
import mlx.core as mx  # noqa: E402  (after the BLAS choice above)


@dataclass(frozen=True)
class Hardware:
    backend: str             # "cuda", "metal" or "cpu"
    device_name: str
    memory_gb: float         # device memory (unified memory on Macs, system RAM on CPU)
    peak_flops: float        # dense peak of the compute dtype, for MFU
    device_batch_size: int   # rows of MAX_SEQ_LEN per forward/backward
    eval_tokens: int
    eval_batch_size: int


def _system_memory_gb():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError, AttributeError):
        return 16.0


def detect_hardware():
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    name = str(info.get("device_name", platform.processor() or "unknown"))
    mem_gb = float(info.get("memory_size") or info.get("total_memory") or 0) / 1024**3 or _system_memory_gb()
    if mx.cuda.is_available():
        # H100 SXM: ~989 TFLOP/s dense bf16. Smaller cards get a smaller batch (train.py: the same model).
        peak = 989e12 if "H100" in name or "H200" in name else 300e12
        batch = 32 if mem_gb >= 60 else 16 if mem_gb >= 30 else 8
        return Hardware("cuda", name, mem_gb, peak, batch, EVAL_TOKENS, batch)
    if mx.metal.is_available():
        # Apple silicon: roughly 30 TFLOP/s bf16 on a Max-class GPU.
        batch = 16 if mem_gb >= 32 else 8
        return Hardware("metal", name, mem_gb, 30e12, batch, EVAL_TOKENS, batch)
    # CPU (train.py: a tiny model in fp32). Peak: 32 fp32 FLOP/cycle/core at ~3 GHz.
    cores = os.cpu_count() or 1
    # Batches of 2 rows: twice the optimizer steps in 5 minutes, which learned more than bigger batches here.
    # Evaluation: 16 rows, ~15 s on 2 cores (2**17 tokens took 62.6 s, a fifth of the budget); what the smaller
    # evaluation costs in precision is measured in docs/evaluation.md.
    return Hardware("cpu", name, mem_gb, cores * 32 * 3e9, 2, 2**15, 8)


def keep_kernel_cache(hardware):
    """On CUDA, MLX compiles its fused kernels with NVRTC the first time each is used (~70 kernels, 137 s of a
    first run's start-up on an H100 machine, against 12 s once cached) and caches them under /tmp, which a reboot
    or a fresh container empties. Keep them beside the data instead, per MLX version and GPU, unless
    MLX_PTX_CACHE_DIR is already set. MLX reads the variable at its first compilation, after this."""
    if hardware.backend != "cuda" or os.environ.get("MLX_PTX_CACHE_DIR"):
        return
    gpu = re.sub(r"[^A-Za-z0-9.-]+", "-", hardware.device_name).strip("-") or "gpu"
    os.environ["MLX_PTX_CACHE_DIR"] = os.path.join(cache_dir(), "mlx-kernels", mx.__version__, gpu)


HARDWARE = detect_hardware()
keep_kernel_cache(HARDWARE)
EVAL_TOKENS = int(os.environ.get("AUTORESEARCH_EVAL_TOKENS", HARDWARE.eval_tokens))


def describe_hardware():
    hw = HARDWARE
    blas = f", BLAS {os.path.basename(FAST_BLAS)}" if FAST_BLAS else ""
    return (f"{hw.backend} ({hw.device_name}, {hw.memory_gb:.0f} GB{blas}) | device batch {hw.device_batch_size}, "
            f"eval {EVAL_TOKENS} tokens")


# ---------------------------------------------------------------------------
# Data: download climbmix shards
# ---------------------------------------------------------------------------

def download_shard(index, base_url, retries=5, backoff=2.0, timeout=60):
    """Download one shard unless it is already complete. Returns None on success, else the last error."""
    import requests

    path = shard_path(index)
    if os.path.exists(path):
        return None  # only complete, checked files are ever renamed to their final name
    url = f"{base_url.rstrip('/')}/{os.path.basename(path)}"
    error = None
    for attempt in range(1, retries + 1):
        try:
            def fetch(tmp):
                with requests.get(url, stream=True, timeout=timeout) as response:
                    response.raise_for_status()
                    expected = response.headers.get("Content-Length")
                    received = 0
                    with open(tmp, "wb") as f:
                        for chunk in response.iter_content(chunk_size=1 << 20):
                            f.write(chunk)
                            received += len(chunk)
                        f.flush()
                        os.fsync(f.fileno())
                if expected is not None and received != int(expected):
                    raise IOError(f"transfer broke off: got {received} of {expected} bytes")
                check_parquet(tmp)
            write_atomic(path, fetch)
            return None
        except (requests.RequestException, IOError, PrepareError) as e:
            error = f"{type(e).__name__}: {e}"
            if attempt < retries:
                time.sleep(backoff * 2 ** (attempt - 1))
    return error


def download_data(num_shards, workers=8, base_url=None, retries=5, backoff=2.0):
    """Fetch training shards 0..num_shards-1 plus the pinned validation shard, in parallel."""
    from tqdm import tqdm

    base_url = base_url or os.environ.get("AUTORESEARCH_DATA_URL") or BASE_URL
    source = {"source": "climbmix", "url": base_url}
    check_data_source(source)  # the cache is claimed only once every shard is in (below)
    os.makedirs(data_dir(), exist_ok=True)
    ids = list(range(min(num_shards, MAX_SHARD))) + [VAL_SHARD]
    todo = [i for i in ids if not os.path.exists(shard_path(i))]
    print(f"Data: {len(ids) - len(todo)}/{len(ids)} shards already in {data_dir()}, downloading {len(todo)} from {base_url}")
    failed = {}
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo) or 1))) as pool:
        futures = {pool.submit(download_shard, i, base_url, retries, backoff): i for i in todo}
        for future in tqdm(as_completed(futures), total=len(futures), desc="Downloading", unit="shard", disable=not todo):
            error = future.result()
            if error:
                failed[futures[future]] = error
    if failed:
        detail = "\n".join(f"  shard {i}: {err}" for i, err in sorted(failed.items()))
        raise PrepareError(
            f"{len(failed)} shard(s) failed to download after retries:\n{detail}\n"
            f"Without internet, use the bundled corpus: uv run prepare.py --source sample --cache-dir "
            f"{shlex.quote(cache_dir())} (or your own text: --source PATH).")  # the same cache, not the default one
    claim_data_source(source)

# ---------------------------------------------------------------------------
# Tokenizer: rustbpe training, saved in tiktoken's format
# ---------------------------------------------------------------------------

def training_text(max_chars=TOKENIZER_MAX_CHARS, doc_cap=TOKENIZER_DOC_CAP, progress=None):
    chars = 0
    for path in list_shards("train"):
        for batch in pq.ParquetFile(path).iter_batches(columns=["text"]):
            for text in batch.column(0).to_pylist():
                doc = text[:doc_cap]
                chars += len(doc)
                if progress is not None:
                    progress.update(len(doc))
                yield doc
                if chars >= max_chars:
                    return


def train_tokenizer():
    """Train the BPE tokenizer on the training shards, unless one for this corpus is cached."""
    import rustbpe
    from tqdm import tqdm

    source = data_source()
    try:
        Tokenizer.from_directory()
        print(f"Tokenizer: already trained for this corpus in {tokenizer_dir()}")
        return
    except PrepareError:
        pass
    os.makedirs(tokenizer_dir(), exist_ok=True)
    t0 = time.time()
    metas = [pq.ParquetFile(p).metadata for p in list_shards("train")]
    text_bytes = sum(m.row_group(g).column(0).total_uncompressed_size for m in metas for g in range(m.num_row_groups))
    total = min(TOKENIZER_MAX_CHARS, text_bytes)  # an estimate: bytes ~ chars, before the per-document cap
    with tqdm(total=total, desc="Tokenizer", unit="char", unit_scale=True) as progress:
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(training_text(progress=progress), VOCAB_SIZE - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        progress.total = progress.n  # the total was an estimate
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    if len(ranks) != VOCAB_SIZE - len(SPECIAL_TOKENS):
        raise PrepareError(f"the corpus is too small for a {VOCAB_SIZE}-token vocabulary: BPE ran out of merges "
                           f"at {len(ranks)} tokens. Use more text: prepare a bigger corpus with --force (or into "
                           "another --cache-dir).")
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    token_bytes = np.array([len(t) for t, _ in by_rank] + [0] * len(SPECIAL_TOKENS), dtype=np.int32)
    meta = {"vocab_size": VOCAB_SIZE, "pattern": bpe.get_pattern(), "special_tokens": SPECIAL_TOKENS, "source": source}

    def write_ranks(tmp):
        with open(tmp, "w") as f:
            f.writelines(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in by_rank)

    def write_token_bytes(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the temp name
            np.save(f, token_bytes)
    write_atomic(os.path.join(tokenizer_dir(), "tokenizer.tiktoken"), write_ranks)
    write_atomic(os.path.join(tokenizer_dir(), "token_bytes.npy"), write_token_bytes)
    # the meta file goes last: its presence marks a complete tokenizer
    write_atomic(os.path.join(tokenizer_dir(), "tokenizer.json"), lambda tmp: Path(tmp).write_text(json.dumps(meta)))
    tok = Tokenizer.from_directory()
    sample = "Hello world! Numbers: 123. Unicode: héllo 你好"
    assert tok.decode(tok.encode(sample)) == sample, "tokenizer round trip failed"
    print(f"Tokenizer: {VOCAB_SIZE} tokens trained in {time.time() - t0:.1f}s, saved to {tokenizer_dir()}")


def read_ranks(path):
    """The BPE ranks of a .tiktoken file (one `base64(token) rank` per line). Read here rather than through
    tiktoken.load, which caches files by path in the temp folder: a cache prepared again with another corpus
    would get the old tokenizer back."""
    with open(path, "rb") as f:
        pairs = (line.split() for line in f if line.strip())
        return {base64.b64decode(token, validate=True): int(rank) for token, rank in pairs}


class Tokenizer:
    """tiktoken encoding of the trained BPE, plus the BOS token."""

    def __init__(self, enc):
        self.enc = enc
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)

    @classmethod
    def from_directory(cls, directory=None):
        import tiktoken

        directory = directory or tokenizer_dir()
        rerun = "Rerun: uv run prepare.py (add the same --source/--cache-dir as before)."
        try:
            with open(os.path.join(directory, "tokenizer.json")) as f:
                meta = json.load(f)
            ranks = read_ranks(os.path.join(directory, "tokenizer.tiktoken"))
            token_bytes = np.load(os.path.join(directory, "token_bytes.npy"))
        except (FileNotFoundError, NotADirectoryError) as e:
            raise PrepareError(f"no trained tokenizer in {directory} ({os.path.basename(e.filename)} missing). {rerun}") from None
        except Exception as e:
            raise PrepareError(f"the tokenizer in {directory} is corrupt ({type(e).__name__}: {e}). {rerun}") from None
        if meta.get("vocab_size") != VOCAB_SIZE or len(ranks) + len(SPECIAL_TOKENS) != VOCAB_SIZE or token_bytes.shape != (VOCAB_SIZE,):
            raise PrepareError(f"the tokenizer in {directory} does not match VOCAB_SIZE={VOCAB_SIZE}. {rerun}")
        # token_bytes.npy weighs every token in val_bpb: it must describe these very ranks, or the metric is wrong
        lengths = np.zeros(VOCAB_SIZE, dtype=np.int64)
        for token, rank in ranks.items():
            if 0 <= rank < VOCAB_SIZE:
                lengths[rank] = len(token)
        if sorted(ranks.values()) != list(range(len(ranks))) or not np.array_equal(lengths, token_bytes):
            raise PrepareError(f"the tokenizer in {directory} does not match its token_bytes.npy (the files come from "
                               f"two different preparations). {rerun}")
        if meta.get("source") != data_source():
            raise PrepareError(f"the tokenizer in {directory} was trained on another corpus than the data in {data_dir()}. {rerun}")
        special = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name="autoresearch", pat_str=meta["pattern"], mergeable_ranks=ranks, special_tokens=special)
        return cls(enc)

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=8):
        """Token ids of a string, or a list of lists for a list of strings; `prepend` is a token id."""
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return ids if prepend is None else [prepend] + ids
        ids = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
        return ids if prepend is None else [[prepend] + row for row in ids]

    def decode(self, ids):
        return self.enc.decode(ids)


def get_token_bytes():
    """UTF-8 byte length of every token id (0 for special tokens), as an MLX int32 array."""
    try:
        return mx.array(np.load(os.path.join(tokenizer_dir(), "token_bytes.npy")).astype(np.int32))
    except (OSError, ValueError) as e:
        raise PrepareError(f"token_bytes.npy is missing or corrupt in {tokenizer_dir()} ({e}). Rerun: uv run prepare.py") from None

# ---------------------------------------------------------------------------
# Dataloader: BOS-aligned best-fit packing
# ---------------------------------------------------------------------------

def document_batches(tokens, offsets, unit_starts, shuffle, seed=SEED, batch_docs=128):
    """Endless (documents as BOS-prefixed token arrays, epoch) batches from a split's token shards. Units are
    the corpus shards' row groups; with `shuffle` (training) units and the documents within each are shuffled
    every epoch, deterministically for a seed; without (validation) they come in file order."""
    epoch = 1
    while True:
        rng = np.random.default_rng([seed, epoch])
        n_units = len(unit_starts) - 1
        for u in rng.permutation(n_units) if shuffle else range(n_units):
            first, last = int(unit_starts[u]), int(unit_starts[u + 1])
            starts = offsets[first:last + 1].tolist()
            order = rng.permutation(last - first).tolist() if shuffle else range(last - first)
            docs = [tokens[starts[i]:starts[i + 1]] for i in order]
            for i in range(0, len(docs), batch_docs):
                yield docs[i:i + batch_docs], epoch
        epoch += 1


def packed_rows(batches, B, T, buffer_size):
    """Endless (B x T+1 int32 rows, epoch) packed best fit (see make_dataloader) from document_batches."""
    lengths, docs = [], []  # the buffer, sorted by length: docs[i] has lengths[i] tokens
    buffer_epoch, pending = 1, None
    while True:
        row = np.empty((B, T + 1), dtype=np.int32)
        epoch = buffer_epoch  # the latest epoch any document of this batch comes from
        for r in range(B):
            pos = 0
            while pos < T + 1:
                while len(docs) < buffer_size:
                    pending = pending or next(batches)
                    new_docs, docs_epoch = pending
                    if docs and docs_epoch > buffer_epoch:
                        break  # use up this epoch's documents before the next epoch's: no mixing
                    pending, buffer_epoch = None, docs_epoch
                    for doc in new_docs:
                        i = bisect_right(lengths, len(doc))
                        lengths.insert(i, len(doc))
                        docs.insert(i, doc)
                space = T + 1 - pos
                i = bisect_right(lengths, space) - 1  # the longest document that fits whole
                if i < 0:
                    i = 0  # none fits: crop the shortest
                lengths.pop(i)
                doc = docs.pop(i)[:space]
                row[r, pos:pos + len(doc)] = doc
                pos += len(doc)
                epoch = max(epoch, buffer_epoch)
        yield row, epoch


def make_dataloader(tokenizer, B, T, split, seed=SEED, buffer_size=1000):
    """Endless (inputs, targets, epoch) batches of shape (B, T) as MLX int32 arrays, from the token shards
    that prepare.py wrote (checked here, at start-up: a missing or stale split stops a run before it trains).

    Every row starts with BOS and is filled with whole documents, best fit first: the longest
    buffered document that fits the space left. Only when none fits is a document cropped
    (the shortest, to fill the row exactly), so there is no padding. A background thread packs
    the next LOADER_PREFETCH batches while the caller computes."""
    assert split in ("train", "val"), split
    # a split evaluate_bpb can't score stops the run now; a training run under the harness cannot read the
    # validation split at all (scoring.py), only its size in the manifest
    manifest = check_token_shards(min_val_tokens=MAX_SEQ_LEN + 1)
    if walled_off(split):
        raise PrepareError(f"the {split} split in {tokens_dir()} is walled off here: under the harness a training run "
                           "cannot read the validation split; only the harness's evaluation (scoring.py) does")
    if tokenizer.get_bos_token_id() != manifest["bos"]:
        raise PrepareError(f"this tokenizer's BOS id differs from the token shards' in {tokens_dir()}. "
                           f"Run: {prepare_command()}")
    tokens, offsets, unit_starts = open_token_split(split, manifest)
    rows = packed_rows(document_batches(tokens, offsets, unit_starts, split == "train", seed), B, T, buffer_size)
    return _prefetched(rows, split)


TOKENS_SERVED = {"train": 0, "val": 0}  # input tokens the dataloaders handed out (scoring.report_step sends it)


def _prefetched(rows, split):
    """Yield (inputs, targets, epoch) from a background thread that packs rows ahead of the consumer."""
    ready, stop = queue.Queue(maxsize=LOADER_PREFETCH), threading.Event()

    def produce():
        try:
            for item in rows:
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, raised there
            ready.put(e)

    threading.Thread(target=produce, daemon=True, name=f"dataloader-{split}").start()
    try:
        while True:
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            row, epoch = item
            TOKENS_SERVED[split] += row.shape[0] * (row.shape[1] - 1)
            yield mx.array(row[:, :-1]), mx.array(row[:, 1:]), epoch
    finally:
        stop.set()  # the consumer is done (closed or garbage-collected): let the producer end

# ---------------------------------------------------------------------------
# Evaluation: the fixed metric
# ---------------------------------------------------------------------------

def cross_entropy_nats(logits, targets):
    """Cross-entropy in nats of each target under (..., V) logits, in float32 whatever the logits' dtype."""
    logits = logits.astype(mx.float32)
    target_logits = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return mx.logsumexp(logits, axis=-1) - target_logits


# Times the largest logit (at most CAUSAL_LOGIT_SCALE): above it, a logit saw a later token. On CPU a causal model's
# logits come out bit-identical (docs/evaluation.md); GPU kernels are given the margin measured on an H100 before
# the check ran on every call, until the tighter one is measured there.
CAUSAL_TOLERANCE = 2.0**-14 if HARDWARE.backend == "cpu" else 2.0**-11
CAUSAL_LOGIT_SCALE = 32.0    # the tolerance grows with the logits up to here, not with a logit blown up on purpose
MAX_LOGIT = 1e4              # logits above this in size are refused: no distribution needs them


def check_causal(model, x, logits, donor=None):
    """Every logit at position t must depend on tokens 0..t of its own row only. Replace the tokens after a cut in
    each row (a random cut per row and per call) with real text (`donor`: rows of another call; by default x's rows
    rotated by one) and run the model once more: the logits up to each cut must stay as they were, up to rounding.
    A model that sees the future (no causal mask, a window that reaches ahead, inputs shifted against the targets,
    rows that read each other) would score a meaningless val_bpb; raise instead."""
    rows, seq = x.shape
    donor = mx.concatenate([x[1:], x[:1]]) if donor is None else donor
    cuts = np.random.default_rng(int.from_bytes(os.urandom(8), "little")).integers(seq // 8, seq - 1, rows)
    after = mx.arange(seq)[None, :] > mx.array(cuts)[:, None]
    changed = model(mx.where(after, donor, x)).astype(mx.float32)
    before = logits.astype(mx.float32)
    diff = mx.where(after[..., None], 0.0, mx.abs(changed - before)).max(axis=-1)  # (rows, seq)
    tolerance = CAUSAL_TOLERANCE * min(max(mx.abs(before).max().item(), 1.0), CAUSAL_LOGIT_SCALE)
    leaks = np.argwhere(np.array(diff) > tolerance)
    if leaks.size:
        r, t = (int(v) for v in leaks[np.argmin(leaks[:, 1])])
        raise ValueError(f"evaluate_bpb: the logits at position {t} of row {r} changed by {diff[r, t].item():.3g} "
                         f"(tolerance {tolerance:.2g}) when only the tokens after position {cuts[r]} changed: the "
                         "model sees the future. Look in train.py for a lost or wrong causal mask, an attention window "
                         "that reaches ahead, inputs shifted against the targets, or rows that mix.")


def eval_shapes(batch_size):
    """The input shape evaluate_bpb calls the model with, every call (a short last call is padded): chunks of at
    most EVAL_CHUNK_TOKENS. scoring.py exports the trained forward pass for exactly this shape."""
    rows = max(1, min(batch_size, EVAL_CHUNK_TOKENS // MAX_SEQ_LEN))
    return [(rows, MAX_SEQ_LEN)]


def evaluate_bpb(model, tokenizer, batch_size):
    """Validation bits per byte: total cross-entropy (nats) over target tokens divided by
    ln(2) * their total UTF-8 bytes; special tokens count 0 bytes and are left out of both sums.
    Returns (val_bpb, tokens evaluated).

    `model(inputs)` must return the logits, (rows, MAX_SEQ_LEN, VOCAB_SIZE), for (rows, MAX_SEQ_LEN) int32
    inputs; the cross-entropy is computed here, so train.py cannot change the metric. Reads the first
    EVAL_TOKENS of the validation split and stops at its end, so no token is counted twice. The model gets
    batch_size rows a call (at most EVAL_CHUNK_TOKENS, to bound the logits' memory); the result does not
    depend on it."""
    token_bytes = get_token_bytes()
    wanted_rows = max(1, EVAL_TOKENS // MAX_SEQ_LEN)
    inputs, targets = [], []
    loader = make_dataloader(tokenizer, 1, MAX_SEQ_LEN, "val")  # one row at a time: the epoch marks each row
    while len(inputs) < wanted_rows:
        x, y, epoch = next(loader)
        if epoch > 1:
            break  # the row holds documents of the split's next pass: each token counts once
        inputs.append(x)
        targets.append(y)
    loader.close()
    if not inputs:
        raise PrepareError(f"the validation split in {data_dir()} holds less than one row of {MAX_SEQ_LEN + 1} tokens. "
                           "Prepare a bigger corpus (prepare.py --source PATH --force).")
    if len(inputs) < wanted_rows:
        # rows are packed from whole documents and cropped, so the split holds more tokens than its rows score
        print(f"Eval: the validation split fills only {len(inputs)} rows of {MAX_SEQ_LEN}: {len(inputs) * MAX_SEQ_LEN:,} "
              f"tokens evaluated, fewer than the {EVAL_TOKENS:,} asked for; each row is evaluated once", flush=True)
    [(rows, _)] = eval_shapes(batch_size)
    bos = tokenizer.get_bos_token_id()
    calls = []
    for i in range(0, len(inputs), rows):
        # every call has the one shape of eval_shapes(): a short last call is padded with rows of BOS, their logits
        # dropped (a model cannot tell a checked call from another by its shape)
        x, y = mx.concatenate(inputs[i:i + rows]), mx.concatenate(targets[i:i + rows])
        calls.append((mx.pad(x, [(0, rows - x.shape[0]), (0, 0)], constant_values=bos), y))
    total_nats, total_bytes = 0.0, 0
    for i, (x, y) in enumerate(calls):
        logits = model(x)
        if logits.shape != (*x.shape, VOCAB_SIZE):
            raise ValueError(f"evaluate_bpb: the model returned shape {logits.shape} for inputs {x.shape}; "
                             f"it must return logits of shape {(*x.shape, VOCAB_SIZE)}")
        mx.eval(logits)  # before the check's second call of the same model
        if mx.abs(logits).max().item() > MAX_LOGIT or not mx.isfinite(logits).all().item():
            raise ValueError(f"evaluate_bpb: the model returned logits that are not finite or above {MAX_LOGIT:g} "
                             "in size; softcap them (train.py's LOGIT_SOFTCAP) or find what blows up")
        # every call is checked, its tails replaced by the next call's rows: real text, not noise to recognise
        donor = calls[(i + 1) % len(calls)][0] if len(calls) > 1 else None
        check_causal(model, x, logits, donor)
        logits = logits[:y.shape[0]]
        nbytes = token_bytes[y]
        nats = mx.where(nbytes > 0, cross_entropy_nats(logits, y), 0.0)
        total_nats += float(np.array(nats).astype(np.float64).sum())  # float64: sums over millions of tokens
        total_bytes += int(np.array(nbytes).sum())
    return total_nats / (math.log(2) * total_bytes), len(inputs) * MAX_SEQ_LEN

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def train_command():
    """The command that trains on this cache: train.py finds a cache other than the default only through the
    environment."""
    if os.path.abspath(cache_dir()) == os.path.abspath(DEFAULT_CACHE_DIR):
        return "uv run train.py"
    return f"AUTORESEARCH_CACHE={shlex.quote(cache_dir())} uv run train.py"


def _holds_local_corpus():
    try:
        return data_source().get("source") == "local"
    except PrepareError:
        return False


KERNEL_CACHES = ("mlx-kernels", "eval-kernels")  # compiled kernels (training's, evaluation's): not the corpus's


def replace_cache(build):
    """--force: run build(), every step of preparation, in a staging folder beside the cache (<cache>.new-<pid>,
    on the same file system) and swap it in only once all of them succeeded. A new corpus that fails at any step
    (unreadable, too small for the tokenizer or for one validation row, a failed download, Ctrl-C) leaves the
    cache as it was, and the staging folder is removed. The swap renames the old cache aside and the new one into
    place, moves the compiled kernel caches over, then deletes the old cache with anything else left in it."""
    cache = cache_dir()
    staging, aside = f"{cache}.new-{os.getpid()}", f"{cache}.old-{os.getpid()}"
    os.makedirs(cache, exist_ok=True)  # a --cache-dir that is a file is found now, not after the whole build
    if os.path.ismount(cache):  # a mount point can't be renamed: found before the build, not after
        raise PrepareError(f"--force builds the new corpus beside {cache} and swaps the two folders, but {cache} is a "
                           "mount point: use a folder inside it as --cache-dir, or empty it and prepare without --force")
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed process that had this pid
    try:
        os.environ["AUTORESEARCH_CACHE"] = staging  # every module finds the cache through it (data_cache.cache_dir)
        try:
            build()
        finally:
            os.environ["AUTORESEARCH_CACHE"] = cache
        os.rename(cache, aside)
        os.rename(staging, cache)
    except BaseException as e:
        if os.path.isdir(aside) and not os.path.exists(cache):
            os.rename(aside, cache)  # stopped between the two renames: the old cache goes back
        shutil.rmtree(staging, ignore_errors=True)
        if not isinstance(e, (PrepareError, OSError)):
            raise  # Ctrl-C: cleaned up, passed on as it is
        problem = str(e).replace(staging, cache) if isinstance(e, PrepareError) else describe_write_error(e, staging)
        raise PrepareError(f"{problem.rstrip('.')}. The cache {cache} is left as it was.") from None
    for name in KERNEL_CACHES:
        if os.path.isdir(os.path.join(aside, name)):
            os.rename(os.path.join(aside, name), os.path.join(cache, name))
    shutil.rmtree(aside)  # the old corpus, and whatever else was in its folder
    print(f"Cache: the new corpus replaced the old one in {cache}")


def prepare_corpus(args):
    """Data, tokenizer and token shards in the cache, each step skipped when its output is already there for
    this corpus; every check a run needs is made before this returns."""
    if args.source:
        discard_unclaimed_shards()
        import_local_corpus(args.source)
    elif _holds_local_corpus():
        print(f"Data: the local corpus already in {data_dir()} (--source replaces it)")
    else:
        download_data(MAX_SHARD if args.num_shards == -1 else args.num_shards, workers=args.download_workers)
    train_tokenizer()
    tokenize_corpus(Tokenizer.from_directory, args.tokenize_workers)
    check_token_shards(min_val_tokens=MAX_SEQ_LEN + 1)  # a cache no run could score is not finished


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare data and tokenizer for autoresearch-mlx")
    parser.add_argument("--num-shards", type=int, default=10, help="climbmix training shards to download (-1: all); the validation shard is always added")
    parser.add_argument("--download-workers", type=int, default=8, help="parallel downloads")
    parser.add_argument("--source", help="'sample' (bundled corpus, offline) or a .txt/.jsonl/.parquet file or folder, instead of downloading")
    parser.add_argument("--cache-dir", help=f"cache directory (default: $AUTORESEARCH_CACHE or {DEFAULT_CACHE_DIR})")
    parser.add_argument("--force", action="store_true", help="replace a different corpus already in the cache")
    parser.add_argument("--tokenize-workers", type=int, help="processes that tokenize the corpus (default: all cores)")
    args = parser.parse_args(argv)
    if args.cache_dir:
        os.environ["AUTORESEARCH_CACHE"] = os.path.abspath(os.path.expanduser(args.cache_dir))
    if args.num_shards == 0 or args.num_shards < -1:
        parser.error("--num-shards must be positive or -1")
    if args.tokenize_workers is not None and args.tokenize_workers < 1:
        parser.error("--tokenize-workers must be at least 1")
    print(f"Cache directory: {cache_dir()}")
    try:
        if args.force:
            replace_cache(lambda: prepare_corpus(args))
        else:
            prepare_corpus(args)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # read-only or full disk, a file where the cache folder should be
        print(f"error: {describe_write_error(e, cache_dir())}", file=sys.stderr)
        return 1
    print(f"Done. Ready to train: {train_command()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
