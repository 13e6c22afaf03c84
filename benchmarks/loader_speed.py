"""
Dataloader throughput: packed tokens/s (rows of MAX_SEQ_LEN, batch 32, best-fit packing) from the memory-mapped
token shards that prepare.py writes, against the old path that tokenized the parquet shards on the fly in the
loader's thread (kept here, as it was, to compare against).

    uv run python benchmarks/loader_speed.py                       # the cache's corpus (AUTORESEARCH_CACHE)
    uv run python benchmarks/loader_speed.py --cores 2             # as if the machine had 2 cores
    uv run python benchmarks/loader_speed.py --cache-limit 0       # the old path as on a corpus over its limit

Each row packs batches for --seconds in one thread, as the loader's background thread does. tok/s counts the
tokens of the packed rows; "CPU ms/batch" is the process's CPU time per batch (tokenizer threads included) and
"CPU cores busy" that over wall time: what the loader takes from the training process. On a loaded machine the
wall-clock columns fall with the CPU share this process gets; CPU ms/batch much less. The old path keeps a split of at most --cache-limit tokens in memory after its first epoch
(100 M before token shards existed), so a corpus smaller than that is tokenized only once: --cache-limit 0 shows
the cost it paid on every epoch of a bigger corpus (the Linux kernel source: ~300 M tokens).
"""

import argparse
import os
import sys
import time

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prepare  # noqa: E402
from data_cache import cache_dir, list_shards  # noqa: E402
from token_shards import check_token_shards, open_token_split  # noqa: E402

OLD_TOKEN_CACHE_LIMIT = 100_000_000  # the old loader kept a split of at most this many tokens in memory


def on_the_fly_batches(tokenizer, split, seed, cache_limit, threads, batch_docs=128):
    """The old document_batches: reads and tokenizes the parquet row groups as it goes, in the same order
    (same seeded shuffles) as prepare.document_batches, so both pack the same rows."""
    units = []
    for path in list_shards(split):
        units += [(path, rg) for rg in range(pq.ParquetFile(path).num_row_groups)]
    bos = tokenizer.get_bos_token_id()
    cache, cached_tokens = {}, 0
    epoch = 1
    while True:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(units)) if split == "train" else range(len(units))
        for u in order:
            docs = cache.get(u)
            if docs is None:
                texts = pq.ParquetFile(units[u][0]).read_row_group(units[u][1], columns=["text"]).column(0).to_pylist()
                docs = [np.array(ids, dtype=np.int32) for ids in tokenizer.encode(texts, prepend=bos, num_threads=threads)]
                cached_tokens += sum(len(d) for d in docs)
                if cached_tokens <= cache_limit:
                    cache[u] = docs
                else:
                    cache = {}
            if split == "train":
                docs = [docs[i] for i in rng.permutation(len(docs))]
            for i in range(0, len(docs), batch_docs):
                yield docs[i:i + batch_docs], epoch
        epoch += 1


def token_shard_batches(split, seed):
    manifest = check_token_shards()
    return prepare.document_batches(*open_token_split(split, manifest), split == "train", seed)


def measure(batches, B, T, seconds):
    """(tokens/s, ms per batch, CPU ms per batch, batches) of best-fit packing from `batches`."""
    rows = prepare.packed_rows(batches, B, T, buffer_size=1000)
    next(rows)  # fills the buffer once: start-up, not throughput
    n, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while True:
        next(rows)
        n += 1
        wall = time.perf_counter() - wall0
        if wall >= seconds:
            break
    cpu = time.process_time() - cpu0
    return n * B * T / wall, 1000 * wall / n, 1000 * cpu / n, n


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="rows per batch")
    parser.add_argument("--seq", type=int, default=prepare.MAX_SEQ_LEN, help="tokens per row")
    parser.add_argument("--seconds", type=float, default=10.0, help="packing time per row of the table")
    parser.add_argument("--cores", type=int, help="pin this process to the first N cores (Linux)")
    parser.add_argument("--threads", type=int, help="the old path's tokenizer threads (default: min(8, cores), as it was)")
    parser.add_argument("--cache-limit", type=int, default=OLD_TOKEN_CACHE_LIMIT,
                        help="the old path's in-memory token limit (0: re-tokenize every epoch)")
    parser.add_argument("--split", choices=["train", "val"], default="train")
    parser.add_argument("--only", choices=["token-shards", "on-the-fly"], help="one row only")
    args = parser.parse_args()
    if args.cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cores])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.threads or min(8, cores)
    tokenizer = prepare.Tokenizer.from_directory()
    manifest = check_token_shards()
    split_tokens = manifest["splits"][args.split]["tokens"]
    print(f"Corpus: {cache_dir()}, {args.split} split {split_tokens:,} tokens | {cores} cores | "
          f"batch {args.batch} x {args.seq} | {args.seconds:g}s per row")
    paths = {"token-shards": ("memory-mapped token shards", "-", lambda: token_shard_batches(args.split, prepare.SEED)),
             "on-the-fly": (f"tokenized on the fly (cache limit {args.cache_limit:,})", str(threads),
                            lambda: on_the_fly_batches(tokenizer, args.split, prepare.SEED, args.cache_limit, threads))}
    print("\n| loader | tokenizer threads | batches | tok/s | ms/batch | CPU ms/batch | CPU cores busy |\n|---|---|---|---|---|---|---|")
    for name, (label, n_threads, batches) in paths.items():
        if args.only and args.only != name:
            continue
        tok_s, ms, cpu_ms, n = measure(batches(), args.batch, args.seq, args.seconds)
        print(f"| {label} | {n_threads} | {n:,} | {tok_s:,.0f} | {ms:.2f} | {cpu_ms:.2f} | {cpu_ms / ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
