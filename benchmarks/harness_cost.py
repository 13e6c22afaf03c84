"""
What the walls cost a real run: the harness's own runner (autoresearch/runner.py) runs the committed train.py inside
bubblewrap and without it, interleaved, on the same warm caches, and prints start-up, steps, tok/s and evaluation
time of each. A first pair of short runs warms the kernel caches. Usage (any backend):
    AUTORESEARCH_CACHE=... uv run benchmarks/harness_cost.py [--budget 20] [--rounds 3] [--readable DIR ...]
--readable: folders the interpreter needs that lie outside it (packages installed with --target, say).
"""

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from autoresearch import runner, sandbox  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--budget", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--readable", nargs="*", default=[])
    args = parser.parse_args()
    walled = sandbox.check()
    if not walled[0]:
        sys.exit(f"no sandbox here: {walled[1]}")
    paths = sandbox.python_paths
    sandbox.python_paths = lambda: paths() + args.readable

    def run(name, budget, seed=42):
        runner.sandbox.check = (lambda: walled) if name == "walled" else (lambda: (False, "off for the measurement"))
        with open(os.devnull, "w") as quiet:
            r = runner.run_train(ROOT, seed, budget, 30 * budget + 600, lambda: None, label=name, stream=quiet)
        s, f = r.summary, r.facts
        if r.failure():
            sys.exit(f"{name} run failed: {r.failure()}\n" + "\n".join(r.tail))
        return {"run": name, "start-up s": f["startup_seconds"], "steps": f["steps"], "tok/s": f["tok_per_sec"],
                "evaluation s": s.get("eval_seconds"), "val_bpb": s["val_bpb"]}

    run("walled", 5), run("plain", 5)  # warm the kernel caches, the evaluation's included
    rows = [run(name, args.budget, 42 + k) for k in range(args.rounds)
            for name in (("walled", "plain") if k % 2 == 0 else ("plain", "walled"))]
    print(f"| {' | '.join(rows[0])} |\n|{'---|' * len(rows[0])}")
    for row in rows:
        print(f"| {' | '.join(f'{v:,.4g}' if isinstance(v, float) else str(v) for v in row.values())} |")
    for name in ("walled", "plain"):
        mine = [r for r in rows if r["run"] == name]
        print(f"{name}: median start-up {statistics.median(r['start-up s'] for r in mine):.2f} s, "
              f"median tok/s {statistics.median(r['tok/s'] for r in mine):,.0f}")


if __name__ == "__main__":
    main()
