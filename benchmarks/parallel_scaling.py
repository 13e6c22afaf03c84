"""
Experiments per hour in parallel mode with 1 worker and with N: the same K candidates are queued at once with
`autoresearch submit` in a throwaway git repository, and timed from the first submit until `autoresearch
wait --all` has every verdict (coordinator and Ray start-up included, as a user would see them).

    uv run --extra parallel python benchmarks/parallel_scaling.py                  # stand-in train.py, 1 and 2 CPU workers
    python benchmarks/parallel_scaling.py --real --workers 1 8 --candidates 16     # this train.py, one worker per GPU
    python benchmarks/parallel_scaling.py --address HEAD_IP:6379 ...               # an existing Ray cluster

The stand-in is the harness tests' train.py: it sleeps --sleep seconds and prints a summary, so it measures the
scheduler alone. --real copies this project's train.py and prepare.py and trains for --budget seconds on the
prepared cache ($AUTORESEARCH_CACHE), after one untimed warm-up run; it also reports each run's training
throughput, which shows what runs sharing a GPU get. Every candidate runs once (--confirm 0); the goal is
experiments/hour with N workers >= 0.9 x N x that of one worker.
"""

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAND_IN = os.path.join(ROOT, "tests", "fixtures", "train.py")
STAND_IN_SCORING = os.path.join(ROOT, "tests", "fixtures", "scoring.py")
sys.path.insert(0, ROOT)
from autoresearch.ledger import read_ledger  # noqa: E402
BRANCH = "autoresearch/scaling"


def git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def make_repo(path, real, sleep):
    """A git repository on an autoresearch branch holding train.py (and prepare.py for --real)."""
    os.makedirs(path)
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.email", "bench@localhost")
    git(path, "config", "user.name", "bench")
    if real:
        for name in ("train.py", "prepare.py", "data_cache.py", "local_corpus.py", "token_shards.py", "fused_ops.py",
                     "scoring.py"):
            shutil.copy(os.path.join(ROOT, name), os.path.join(path, name))
    else:
        with open(STAND_IN) as f:
            text = re.sub(r"^SLEEP = .*$", f"SLEEP = {sleep!r}", f.read(), count=1, flags=re.M)
        with open(os.path.join(path, "train.py"), "w") as f:
            f.write(text)
        # scoring.py: the real protocol with the harness tests' stand-in evaluation appended
        with open(os.path.join(ROOT, "scoring.py")) as f, open(STAND_IN_SCORING) as tail:
            real = f.read()
            scoring = real[:real.rindex('if __name__ == "__main__":')] + tail.read()
        with open(os.path.join(path, "scoring.py"), "w") as f:
            f.write(scoring)
    with open(os.path.join(path, ".gitignore"), "w") as f:
        f.write("results.tsv\nrun.log\nprogress.png\n.autoresearch/\n__pycache__/\n")
    git(path, "add", ".")
    git(path, "commit", "-q", "-m", "initial")
    git(path, "checkout", "-q", "-b", BRANCH)


def autoresearch(repo, env, *args, timeout=None):
    result = subprocess.run([sys.executable, "-m", "autoresearch", *args], cwd=repo, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        sys.exit(f"error: `autoresearch {' '.join(args)}` exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def measure(workers, args):
    """(wall seconds, {status: count}, mean training tok/s of one run or None) for args.candidates candidates on
    `workers` workers."""
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        repo = os.path.join(tmp, "repo")
        make_repo(repo, args.real, args.sleep)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               "AUTORESEARCH_WORKERS": str(workers), "AUTORESEARCH_IDLE": "120"}
        if args.address:
            env["AUTORESEARCH_RAY_ADDRESS"] = args.address
        t0 = time.monotonic()
        try:
            for i in range(args.candidates):
                with open(os.path.join(repo, "train.py"), "a") as f:
                    f.write(f"\n# candidate {i}\n")  # each candidate's content differs: none is skipped as a repeat
                autoresearch(repo, env, "submit", "-m", f"candidate {i}", "--budget", f"{args.budget:g}",
                             "--confirm", "0", timeout=300)
            autoresearch(repo, env, "wait", "--all")
            elapsed = time.monotonic() - t0
        finally:
            subprocess.run([sys.executable, "-m", "autoresearch", "stop"], cwd=repo, env=env, capture_output=True,
                           timeout=120)
        with open(os.path.join(repo, "results.tsv")) as f:
            statuses = [row["status"] for row in csv.DictReader(f, delimiter="\t")]
        # what each run trained at (runs that share a GPU each get part of it); the stand-in's figures are made up
        metrics = [r.get("metrics") or {} for r in read_ledger(repo)] if args.real else []
        rates = [m["total_tokens_M"] * 1e6 / m["training_seconds"] for m in metrics
                 if isinstance(m.get("total_tokens_M"), float) and m.get("training_seconds")]
    return elapsed, {status: statuses.count(status) for status in sorted(set(statuses))}, \
        (sum(rates) / len(rates) if rates else None)


def warm_up():
    """One short train.py run before anything is timed: on a fresh CUDA machine MLX first compiles its kernels
    (about 2 minutes, then cached), which would otherwise land in the first row alone. Warms this machine only."""
    t0 = time.monotonic()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "AUTORESEARCH_TIME_BUDGET": "1"})
    if result.returncode != 0:
        sys.exit(f"error: the warm-up train.py run exited {result.returncode}:\n{result.stdout[-2000:]}"
                 f"{result.stderr[-2000:]}")
    print(f"warm-up train.py run (kernel compilation): {time.monotonic() - t0:.0f} s\n", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure (first: the baseline)")
    parser.add_argument("--candidates", type=int, default=8, help="candidates per measurement (default %(default)s)")
    parser.add_argument("--real", action="store_true", help="this project's train.py instead of the sleeping stand-in")
    parser.add_argument("--sleep", type=float, default=5.0, help="stand-in: seconds each run sleeps (default %(default)g)")
    parser.add_argument("--budget", type=float, default=60.0, help="--real: training seconds per run (default %(default)g)")
    parser.add_argument("--address", help="an existing Ray cluster (default: a local one per measurement)")
    args = parser.parse_args()
    if args.candidates < 1 or min(args.workers) < 1:
        parser.error("--candidates and --workers must be at least 1")
    what = f"train.py, {args.budget:g} s budget" if args.real else f"stand-in train.py sleeping {args.sleep:g} s"
    print(f"{args.candidates} candidates, {what}, Ray cluster: {args.address or 'local'}\n", flush=True)
    if args.real:
        warm_up()
    print("| workers | wall s | experiments/hour | speedup | efficiency | tok/s per run | verdicts |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    first_rate = None
    for workers in args.workers:
        elapsed, verdicts, run_rate = measure(workers, args)
        rate = args.candidates / elapsed * 3600
        first_rate = first_rate or rate
        speedup = rate / first_rate  # against the first row; efficiency: per worker, against the first row's
        efficiency = speedup * args.workers[0] / workers
        counts = ", ".join(f"{n} {status}" for status, n in verdicts.items())
        run_rate = f"{run_rate:,.0f}" if run_rate else "-"
        print(f"| {workers} | {elapsed:.1f} | {rate:,.0f} | {speedup:.2f}x | {efficiency:.2f} | {run_rate} | {counts} |",
              flush=True)


if __name__ == "__main__":
    main()
