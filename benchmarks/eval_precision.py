"""
What a smaller evaluation costs in val_bpb precision: trains train.py's model (one per seed), scores every
row of the validation split once, row by row, then splits the rows into disjoint subsets of each evaluation
size and reports the std of val_bpb over them, for one model and for the difference of two (what the keep
gate compares), plus the evaluation time per row.

    AUTORESEARCH_CACHE=DIR uv run python benchmarks/eval_precision.py --budget 120 --seeds 1 2

Subsets are as many as the split allows (disjoint: no row in two of them); where a size has fewer than
2 subsets, only the scaling estimate is given: std(n rows) = std(1 row) / sqrt(n), rows as independent
draws (a ratio estimate: nats - bpb ln2 bytes per row).
"""

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prepare  # noqa: E402  (before mlx: the CPU BLAS choice)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import train  # noqa: E402


def score_rows(model, tokenizer, max_rows=None):
    """(nats, bytes) of every row of the validation split (or its first max_rows), each row once, and the
    seconds per row."""
    token_bytes = prepare.get_token_bytes()
    loader = prepare.make_dataloader(tokenizer, 1, prepare.MAX_SEQ_LEN, "val")
    nats, nbytes, seconds = [], [], []
    for x, y, epoch in loader:
        if epoch > 1 or len(nats) == max_rows:
            break
        t0 = time.time()
        b = token_bytes[y]
        n = mx.where(b > 0, prepare.cross_entropy_nats(model(x), y), 0.0)
        nats.append(float(np.array(n).astype(np.float64).sum()))
        nbytes.append(int(np.array(b).sum()))
        seconds.append(time.time() - t0)
    loader.close()
    return np.array(nats), np.array(nbytes), float(np.median(seconds[1:] or seconds))


def train_and_score(seed, max_rows=None):
    """Run train.py's main() for this seed; its hand-over to scoring.py is replaced by score_rows."""
    scored = {}

    def capture(model):
        scored["rows"] = score_rows(model, prepare.Tokenizer.from_directory(), max_rows)
        nats, nbytes, _ = scored["rows"]
        return nats.sum() / (math.log(2) * nbytes.sum()), len(nats) * prepare.MAX_SEQ_LEN
    train.SEED = seed
    train.score_model = capture
    train.main()
    return scored["rows"]


def subset_stds(nats, nbytes, n):
    """std of val_bpb over disjoint subsets of n rows (None if fewer than 2), and the 1/sqrt(n) estimate."""
    bpb = nats.sum() / (math.log(2) * nbytes.sum())
    per_row = (nats - bpb * math.log(2) * nbytes) / (math.log(2) * nbytes.mean())
    scaled = per_row.std(ddof=1) / math.sqrt(n)
    k = len(nats) // n
    if k < 2:
        return None, scaled, k
    groups = [slice(i * n, (i + 1) * n) for i in range(k)]
    values = [nats[g].sum() / (math.log(2) * nbytes[g].sum()) for g in groups]
    return float(np.std(values, ddof=1)), scaled, k


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=120, help="training seconds per model")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="rows of 2048 tokens")
    parser.add_argument("--max-rows", type=int, help="score only the split's first rows (smoke tests)")
    args = parser.parse_args()
    default_budget, profile_rows = prepare.TIME_BUDGET, prepare.EVAL_TOKENS // prepare.MAX_SEQ_LEN
    prepare.TIME_BUDGET = train.TIME_BUDGET = args.budget
    results = {seed: train_and_score(seed, args.max_rows) for seed in args.seeds}
    print("\n=== evaluation precision ===")
    print(f"cache {prepare.cache_dir()}, {prepare.describe_hardware()}, budget {args.budget:g}s per model")
    for seed, (nats, nbytes, sec) in results.items():
        print(f"seed {seed}: {len(nats)} rows, val_bpb over all {nats.sum() / (math.log(2) * nbytes.sum()):.4f}, "
              f"{sec:.2f}s per row of {prepare.MAX_SEQ_LEN} tokens")
    a = results[args.seeds[0]]
    eval_seconds = a[2] * profile_rows
    print(f"evaluation at this backend's {prepare.EVAL_TOKENS} tokens ({profile_rows} rows): ~{eval_seconds:.0f}s, "
          f"{100 * eval_seconds / default_budget:.0f}% of a {default_budget:g}s budget")
    pairs = len(args.seeds) >= 2
    if pairs:
        b = results[args.seeds[1]]
        # the gate compares two models on the same rows: the difference's nats, on the same bytes
        diff = (a[0] - b[0], a[1])
    print(f"{'rows':>5} {'tokens':>8} {'subsets':>7} {'std bpb':>9} {'~1/sqrt(n)':>10}"
          + (f" {'std diff':>9} {'~1/sqrt(n)':>10}" if pairs else ""))
    for n in args.sizes:
        std, scaled, k = subset_stds(a[0], a[1], n)
        line = f"{n:>5} {n * prepare.MAX_SEQ_LEN:>8} {k:>7} {std if std is not None else float('nan'):>9.4f} {scaled:>10.4f}"
        if pairs:
            dstd, dscaled, _ = subset_stds(diff[0], diff[1], n)
            line += f" {dstd if dstd is not None else float('nan'):>9.4f} {dscaled:>10.4f}"
        print(line)


if __name__ == "__main__":
    main()
