"""
Training speed of train.py: tok/s, step time, MFU, peak memory and start-up (compile) time, for the
current train.py and for the original autoresearch configuration, each run as its own process.

    uv run python benchmarks/train_speed.py                        # configs for the detected backend
    uv run python benchmarks/train_speed.py --budget 60 --set WINDOW_PATTERN='"L"'   # try a lever
    uv run python benchmarks/train_speed.py --script old_train.py   # another version of train.py, side by side
    AUTORESEARCH_CACHE=DIR ...                                     # any prepared cache (--source sample works)

Each config is train.py with some constants replaced (by name, in a temporary copy beside it), run for
--budget training seconds with a small evaluation. tok/s is the mean of the progress lines after the first.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The original autoresearch run: depth 8, dim 512, 4 heads of 128, seq 2048, SSSL, 2^19 tokens per step.
ORIGINAL = {"DEPTH": "8", "ASPECT_RATIO": "64", "HEAD_DIM": "128", "WINDOW_PATTERN": '"SSSL"',
            "DEVICE_BATCH_SIZE": "32", "TOTAL_BATCH_SIZE": "2**19"}
# The same shape at CPU scale (depth 2, 1 row per micro-step), so CI can smoke-test this script.
ORIGINAL_CPU = {**ORIGINAL, "DEPTH": "2", "DEVICE_BATCH_SIZE": "1", "TOTAL_BATCH_SIZE": "2**11"}


def with_constants(source, overrides):
    for name, value in overrides.items():
        source, n = re.subn(rf"^{name} = .*$", f"{name} = {value}", source, count=1, flags=re.M)
        if n == 0:
            raise SystemExit(f"train.py has no top-level constant {name} to override")
    return source


def run_config(overrides, budget, eval_tokens, timeout, script="train.py"):
    """Run a copy of `script` (train.py) with `overrides`; returns the parsed numbers (or the error)."""
    with open(os.path.join(ROOT, script)) as f:
        source = with_constants(f.read(), overrides)
    with tempfile.NamedTemporaryFile("w", suffix=".py", prefix="bench_train_", dir=ROOT, delete=False) as f:
        f.write(source)
        script = f.name
    env = {**os.environ, "AUTORESEARCH_TIME_BUDGET": str(budget), "AUTORESEARCH_EVAL_TOKENS": str(eval_tokens),
           "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s"}
    finally:
        os.remove(script)
    out = proc.stdout
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or out.strip().splitlines() or ["?"])[-1]}
    summary = {k: float(v) for k, v in re.findall(r"^(\w+):\s+([-\d.]+)\s*$", out, flags=re.M)}
    rates = [float(r.replace(",", "")) for r in re.findall(r"\| ([\d,]+) tok/s \|", out)][1:]
    hardware = re.search(r"^Hardware: (\w+) \(([^,]+)", out, flags=re.M)
    batch = re.search(r"^Batch: (\d+) tokens per step", out, flags=re.M)
    startup = re.search(r"^Startup: ([\d.]+)s", out, flags=re.M)
    tok_s = sum(rates) / len(rates) if rates else float("nan")
    return {"backend": hardware.group(1), "device": hardware.group(2), "tok_s": tok_s,
            "step_ms": 1000 * int(batch.group(1)) / tok_s, "mfu": summary["mfu_percent"],
            "peak_gb": summary["peak_vram_mb"] / 1024, "startup_s": float(startup.group(1)),
            "wall_s": time.time() - t0}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=None, help="training seconds per config (default: 60 on GPU, 15 on CPU)")
    parser.add_argument("--eval-tokens", type=int, default=2 * 2048, help="validation tokens (kept small: speed only)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a train.py constant in every config (repeatable)")
    parser.add_argument("--only", choices=["train.py", "original"], help="run one config")
    parser.add_argument("--script", default="train.py", help="the training script to measure, e.g. an older copy of "
                        "train.py (default: train.py)")
    args = parser.parse_args()

    sys.path.insert(0, ROOT)
    from prepare import HARDWARE  # after the path: prepare.py lives beside train.py
    on_cpu = HARDWARE.backend == "cpu"
    budget = args.budget or (15 if on_cpu else 60)
    extra = dict(s.split("=", 1) for s in args.set)
    configs = {"train.py": extra, "original": {**(ORIGINAL_CPU if on_cpu else ORIGINAL), **extra}}
    if args.only:
        configs = {args.only: configs[args.only]}

    rows = []
    for name, overrides in configs.items():
        label = name + (" (CPU scale)" if on_cpu and name == "original" else "")
        print(f"running {label} for {budget:g}s{' with ' + str(extra) if extra else ''} ...", file=sys.stderr, flush=True)
        rows.append((label, run_config(overrides, budget, args.eval_tokens, timeout=budget + 900, script=args.script)))

    print(f"\n| config | backend | device | tok/s | step ms | MFU % | peak GB | startup s |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r in rows:
        if "error" in r:
            print(f"| {label} | error: {r['error']} | | | | | | |")
            continue
        print(f"| {label} | {r['backend']} | {r['device']} | {r['tok_s']:,.0f} | {r['step_ms']:.1f} | "
              f"{r['mfu']:.2f} | {r['peak_gb']:.2f} | {r['startup_s']:.1f} |")
    if extra:
        print(f"\noverrides: {extra}")
    return 1 if any("error" in r for _, r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
