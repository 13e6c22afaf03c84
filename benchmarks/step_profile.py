"""
Where a training step's time goes: the compiled forward+backward of one micro-batch of train.py at the
original autoresearch configuration (depth 8, dim 512, 4 heads of 128, seq 2048, device batch 32), with one
lever changed per row, plus the attention and the loss head on their own. Random tokens, no data needed.

    uv run python benchmarks/step_profile.py                    # the detected device (CPU: a small config)
    uv run python benchmarks/step_profile.py --baseline OLD.py  # add a row for another version of train.py
    python benchmarks/step_profile.py --kernels 40              # CUDA: also the 40 costliest kernels of a step

Times are milliseconds per micro-batch (the mean of --iters after --warmup calls, each waited for); tok/s
is tokens per micro-batch over that time, so it leaves out the optimizer update and data loading
(benchmarks/train_speed.py measures whole runs).
"""

import argparse
import contextlib
import gc
import importlib.util
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import prepare  # noqa: E402  (before mlx: it picks the CPU BLAS)
import fused_ops  # noqa: E402
import mlx.core as mx  # noqa: E402
import train  # noqa: E402

GPU_SHAPE = dict(batch=32, seq=2048, depth=8)
CPU_SHAPE = dict(batch=1, seq=256, depth=2)


def timed(fn, args, warmup, iters):
    """(ms per call, peak GB, seconds of the warm-up calls, which include compilation)."""
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    for _ in range(warmup):
        mx.eval(fn(*args))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        mx.eval(fn(*args))
    return 1000 * (time.perf_counter() - t0) / iters, mx.get_peak_memory() / 1024**3, compile_s


@contextlib.contextmanager
def patched(module, patches):
    """module's attributes set to patches' values for the duration, then put back."""
    saved = {name: getattr(module, name) for name in patches}
    for name, value in patches.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def portable(fn):
    """fn with the fused CUDA kernels switched off: the MLX-ops path every other backend takes."""
    def call(*args, **kwargs):
        with fused_ops.mlx_ops_only():
            return fn(*args, **kwargs)
    return call


def micro_step(module, patches, window_pattern, shape, measure):
    """measure(step, args) for the compiled forward+backward of module's GPT, module attributes patched meanwhile."""
    try:
        with patched(module, patches):
            config = module.config_for_depth(shape["depth"])
            config.sequence_len, config.window_pattern = shape["seq"], window_pattern
            mx.random.seed(0)
            model = module.GPT(config)
            model.init_weights()
            mx.eval(model.parameters())

            step = train.compiled_loss_and_grad(model)  # train.py's own step, for a baseline's model too
            tokens = mx.random.randint(0, config.vocab_size, (shape["batch"], shape["seq"] + 1))
            return measure(step, [tokens[:, :-1], tokens[:, 1:]])
    finally:
        gc.collect()
        mx.clear_cache()


def kernel_times(step, args, calls):
    """{kernel name: (ms, launches)} per call of step, over `calls` calls, from PyTorch's profiler: it reads
    CUPTI, which records every GPU kernel of the process, MLX's included. Needs PyTorch built for CUDA."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    mx.eval(step(*args))  # compiled and warm before the profile starts
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            mx.eval(step(*args))
    kernels = {}
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            ms, launches = kernels.get(event.name, (0.0, 0))
            kernels[event.name] = (ms + event.device_time_total / 1000 / calls, launches + 1 / calls)
    return kernels


def kernel_table(kernels, top):
    """Markdown rows: the total, then the `top` costliest kernels with ms, launches and share of the total."""
    total = sum(ms for ms, _ in kernels.values())
    lines = [f"| all {round(sum(n for _, n in kernels.values()))} launches | {total:.2f} | | 100 % |"]
    for name, (ms, launches) in sorted(kernels.items(), key=lambda item: -item[1][0])[:top]:
        short = name if len(name) <= 110 else name[:107] + "..."
        lines.append(f"| {short.replace('|', '/')} | {ms:.3f} | {round(launches)} | {100 * ms / total:.1f} % |")
    return lines


def load_module(path):
    spec = importlib.util.spec_from_file_location("baseline_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="another train.py (e.g. `git show OLD:train.py > old.py`) for one more row")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--kernels", type=int, default=0, metavar="N",
                        help="also list the N costliest GPU kernels of one micro-step of train.py (CUDA, needs PyTorch)")
    args = parser.parse_args()
    on_cpu = prepare.HARDWARE.backend == "cpu"
    shape = CPU_SHAPE if on_cpu else GPU_SHAPE
    B, T, pattern = shape["batch"], shape["seq"], train.WINDOW_PATTERN
    tokens = B * T
    print(f"{prepare.describe_hardware()}\nmicro-batch: {B} x {T} tokens, depth {shape['depth']}, "
          f"window pattern {pattern}{' (CPU: a small config)' if on_cpu else ''}\n", flush=True)

    rows = [("train.py as is", train, {}, pattern),
            ("QK norm + rotary as MLX ops (no fused kernel)", train, {"norm_rotary": portable(fused_ops.norm_rotary)}, pattern),
            ("loss as MLX ops (no fused kernel)", train,
             {"softcap_cross_entropy": portable(fused_ops.softcap_cross_entropy)}, pattern),
            ('SHORT_WINDOW = "chunked"', train, {"SHORT_WINDOW": "chunked"}, pattern),
            ('WINDOW_PATTERN = "L" (no short windows)', train, {}, "L")]
    if args.baseline:
        rows.insert(0, (f"baseline: {os.path.basename(args.baseline)}", load_module(args.baseline), {}, pattern))
    print("| micro-step fwd+bwd | ms | tok/s | peak GB | warm-up s |\n|---|---|---|---|---|", flush=True)
    for label, module, patches, window_pattern in rows:
        ms, gb, compile_s = micro_step(module, patches, window_pattern, shape,
                                       lambda step, inputs: timed(step, inputs, args.warmup, args.iters))
        print(f"| {label} | {ms:.1f} | {tokens / ms * 1000:,.0f} | {gb:.1f} | {compile_s:.1f} |", flush=True)

    # attention alone: one layer's kernels on (B, T, H, D) inputs, forward and backward
    heads, head_dim = 4, 128
    dtype = train.COMPUTE_DTYPE
    q, k, v, dy = (mx.random.normal((B, T, heads, head_dim)).astype(dtype) for _ in range(4))
    mx.eval(q, k, v, dy)
    print("\n| one attention layer, fwd+bwd | ms |\n|---|---|")
    variants = [("full causal (L)", T, {})]
    variants += [(f"sliding window {T // 2}, query blocks of {block}", T // 2, {"SLIDING_BLOCK": block})
                 for block in (T // 8, T // 4, T // 2)]
    variants += [(f"chunked window {T // 2}", T // 2, {"SHORT_WINDOW": "chunked"})]
    for label, window, patches in variants:
        with patched(train, patches):
            grad = mx.compile(mx.grad(lambda q, k, v: (train.attention(q, k, v, window).astype(mx.float32) * dy).sum(),
                                      argnums=(0, 1, 2)))
            ms, _, _ = timed(grad, [q, k, v], args.warmup, args.iters)
        print(f"| {label} | {ms:.2f} |", flush=True)

    # the loss head alone: lm_head matmul, softcap and cross-entropy, forward and backward
    dim, vocab = 512, prepare.VOCAB_SIZE
    x = mx.random.normal((B, T, dim)).astype(dtype)
    w = 0.01 * mx.random.normal((vocab, dim))
    targets = mx.random.randint(0, vocab, (B, T))
    print("\n| loss head (matmul, softcap, cross-entropy), fwd+bwd | ms | peak GB |\n|---|---|---|")
    for label, loss_fn in [("fused kernel where available", fused_ops.softcap_cross_entropy),
                           ("MLX ops", portable(fused_ops.softcap_cross_entropy))]:
        head = mx.compile(mx.grad(lambda x, w: loss_fn(x @ w.astype(dtype).T, targets, train.LOGIT_SOFTCAP).mean(),
                                  argnums=(0, 1)))
        ms, gb, _ = timed(head, [x, w], args.warmup, args.iters)
        print(f"| {label} | {ms:.2f} | {gb:.1f} |", flush=True)

    if args.kernels:
        if not fused_ops.KERNELS:
            print("\n(--kernels: skipped, it profiles CUDA kernels)")
            return 0
        kernels = micro_step(train, {}, pattern, shape, lambda step, inputs: kernel_times(step, inputs, args.iters))
        print("\n| kernels of one micro-step of train.py as is | ms | launches | share |\n|---|---|---|---|")
        print("\n".join(kernel_table(kernels, args.kernels)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
