"""
What the sandbox costs a run's start-up: the same Python start (prepare.py and MLX imported, one op evaluated)
plain and inside bubblewrap with the binds the harness uses, interleaved. Usage:
    AUTORESEARCH_CACHE=... uv run benchmarks/sandbox_cost.py [--rounds 8]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from autoresearch import runner, sandbox  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    enforced, how = sandbox.check()
    if not enforced:
        sys.exit(f"no sandbox here: {how}")
    cache = runner.cache_path()
    argv = [sys.executable, "-c", "import prepare, mlx.core as mx; mx.eval(mx.ones(4) * 2)"]
    with tempfile.TemporaryDirectory() as scratch:
        walled = sandbox.command(argv, ROOT, scratch, cache, writable=[os.path.join(cache, "mlx-kernels")],
                                 hidden=[os.path.join(cache, "tokens", "val.bin")], readable=sandbox.python_paths())
        env = {**os.environ, "AUTORESEARCH_CACHE": cache}
        times = {"plain": [], "bubblewrap": []}
        for _ in range(args.rounds):
            for name, command in (("plain", argv), ("bubblewrap", walled)):
                t0 = time.monotonic()
                subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
                times[name].append(time.monotonic() - t0)
    plain = statistics.median(times["plain"])
    print(f"| start | median of {args.rounds} | vs plain |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.3f} s | {statistics.median(values) - plain:+.3f} s |")


if __name__ == "__main__":
    main()
