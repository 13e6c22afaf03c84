"""
MLX on CPU: matmul GFLOP/s and training tok/s with MLX's bundled reference BLAS vs a fast BLAS.

    uv run benchmarks/cpu_blas.py                      # numpy, MLX reference BLAS, MLX as prepare.py sets it up
    uv run benchmarks/cpu_blas.py --lib /path/libmkl_rt.so.3 --lib /usr/lib/x86_64-linux-gnu/libopenblas.so.0
    uv run benchmarks/cpu_blas.py --batch 2            # quicker: the reference-BLAS step takes ~30 s at batch 8

Each variant runs in a fresh interpreter, because a BLAS can only take over MLX's calls if it is loaded
before mlx is imported (see load_fast_cpu_blas in prepare.py). Rows in one table come from one run, so
their ratios are comparable; absolute numbers on shared cloud cores drift by 10-20% between runs.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(1024, 1024, 1024), (512, 2048, 8192)]  # (M, K, N): square, and a wide LM-head-like product


def _timed(fn, min_reps=2, max_reps=20, min_seconds=1.5):
    """Best time of several calls after one warm-up call: the best is the least noisy on shared cores."""
    fn()
    best, total, reps = float("inf"), 0.0, 0
    while reps < min_reps or (total < min_seconds and reps < max_reps):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, total, reps = min(best, dt), total + dt, reps + 1
    return best


def bench_numpy():
    import numpy as np
    rng = np.random.default_rng(0)
    out = {}
    for m, k, n in SHAPES:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        out[f"{m}x{k}x{n}"] = 2 * m * k * n / _timed(lambda a=a, b=b: a @ b) / 1e9
    return {"matmul": out}


def bench_mlx(batch, seq, steps_seconds):
    import numpy as np
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    matmul, rel_err = {}, 0.0
    for m, k, n in SHAPES:
        a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
        mx.eval(a, b)
        matmul[f"{m}x{k}x{n}"] = 2 * m * k * n / _timed(lambda a=a, b=b: mx.eval(a @ b)) / 1e9
        exact = np.array(a).astype(np.float64) @ np.array(b).astype(np.float64)
        rel_err = max(rel_err, float(np.abs(np.array(a @ b) - exact).max() / np.abs(exact).max()))

    # A tiny pre-norm GPT, trained for a few steps: forward + backward + AdamW, fp32 like prepare.py's CPU profile.
    layers, dim, heads, vocab = 4, 256, 4, 8192

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
            self.up, self.down = nn.Linear(dim, 4 * dim, bias=False), nn.Linear(4 * dim, dim, bias=False)
            self.rope = nn.RoPE(dim // heads)

        def __call__(self, x):
            B, T, _ = x.shape
            q, k, v = (t.reshape(B, T, heads, -1).transpose(0, 2, 1, 3) for t in mx.split(self.qkv(self.norm1(x)), 3, -1))
            q, k = self.rope(q), self.rope(k)
            y = mx.fast.scaled_dot_product_attention(q, k, v, scale=(dim // heads) ** -0.5, mask="causal")
            x = x + self.proj(y.transpose(0, 2, 1, 3).reshape(B, T, dim))
            return x + self.down(nn.relu(self.up(self.norm2(x))) ** 2)

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.blocks = [Block() for _ in range(layers)]
            self.norm, self.head = nn.RMSNorm(dim), nn.Linear(dim, vocab, bias=False)

        def __call__(self, idx):
            x = self.embed(idx)
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x))

    mx.random.seed(0)
    model, opt = GPT(), optim.AdamW(learning_rate=1e-3)
    mx.eval(model.parameters())
    tokens = mx.random.randint(0, vocab, (batch, seq + 1))

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def step():
        loss, grads = loss_and_grad(model, tokens[:, :-1], tokens[:, 1:])
        opt.update(model, grads)
        mx.eval(loss, model.parameters(), opt.state)

    dt = _timed(step, min_reps=2, max_reps=10, min_seconds=steps_seconds)
    # Matmul FLOPs of fwd+bwd: 6 per weight per token, plus causal attention's QK^T and AV (12*L*T*d/2).
    flops_per_token = 6 * (layers * 12 * dim * dim + dim * vocab) + 6 * layers * seq * dim
    return {"matmul": matmul, "rel_err": rel_err, "tok_s": batch * seq / dt,
            "step_gflops": flops_per_token * batch * seq / dt / 1e9}


def worker(args):
    blas = "-"
    if args.variant == "numpy":
        result = bench_numpy()
        import numpy as np
        cfg = np.show_config(mode="dicts") if hasattr(np, "show_config") else {}
        blas = cfg.get("Build Dependencies", {}).get("blas", {}).get("name", "?") if cfg else "?"
    else:
        if args.variant == "lib":
            import ctypes
            ctypes.CDLL(args.lib, mode=os.RTLD_GLOBAL)  # before mlx, like prepare.py does
            blas = args.lib
        elif args.variant == "prepare":
            sys.path.insert(0, ROOT)
            import prepare  # loads the fast BLAS (or not) the way training runs will
            blas = getattr(prepare, "FAST_BLAS", None) or "bundled reference"
        else:
            blas = "bundled reference"
        result = bench_mlx(args.batch, args.seq, args.step_seconds)
    result["blas"] = os.path.basename(blas)
    print("RESULT " + json.dumps(result))


def run_variant(name, extra_args, env_overrides, args):
    env = dict(os.environ, **env_overrides)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--batch", str(args.batch),
           "--seq", str(args.seq), "--step-seconds", str(args.step_seconds)] + extra_args
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"  {name}: failed ({tail})", file=sys.stderr)
        return None
    print(f"  {name}: done in {time.time() - t0:.0f} s", file=sys.stderr)
    return json.loads(lines[-1][len("RESULT "):])


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--lib", action="append", default=[], help="also run MLX with this BLAS library preloaded")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--step-seconds", type=float, default=10.0, help="time spent on timed training steps")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="reference", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.lib = args.lib[0] if args.lib else None
        return worker(args)

    no_blas = {"AUTORESEARCH_FAST_BLAS": "0"}
    variants = [("numpy", ["--variant", "numpy"], {}),
                ("mlx, bundled BLAS", ["--variant", "reference"], no_blas),
                ("mlx via prepare.py", ["--variant", "prepare"], {})]
    variants += [(f"mlx + {os.path.basename(lib)}", ["--variant", "lib", "--lib", lib], no_blas) for lib in args.lib]

    threads = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    print(f"{os.cpu_count()} CPUs, thread env {threads or 'unset'}; "
          f"model: 4 layers, dim 256, vocab 8192, batch {args.batch} x seq {args.seq}, fp32", file=sys.stderr)
    results = [(name, run_variant(name, extra, env, args)) for name, extra, env in variants]

    shapes = [f"{m}x{k}x{n}" for m, k, n in SHAPES]
    ref = dict(results).get("mlx, bundled BLAS")
    header = "| variant | BLAS | " + " | ".join(f"{s} GFLOP/s" for s in shapes) + " | rel. err | train tok/s | step GFLOP/s | tok/s vs bundled |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, r in results:
        if r is None:
            print(f"| {name} | failed |" + " - |" * (header.count("|") - 3))
            continue
        mm = " | ".join(f"{r['matmul'][s]:.1f}" for s in shapes)
        if "tok_s" in r:
            speedup = f"{r['tok_s'] / ref['tok_s']:.1f}x" if ref else "-"
            train = f"{r['rel_err']:.1e} | {r['tok_s']:.0f} | {r['step_gflops']:.1f} | {speedup}"
        else:
            train = "- | - | - | -"
        print(f"| {name} | {r['blas']} | {mm} | {train} |")


if __name__ == "__main__":
    main()
