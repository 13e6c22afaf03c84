"""fused_ops.py: each op against its formula and autodiff, on the path the hardware takes (CUDA kernels on NVIDIA
GPUs, MLX ops elsewhere) and on the MLX-ops path everywhere. The CUDA-only tests skip without a GPU."""
import os
import subprocess
import sys

import mlx.core as mx
import pytest

import fused_ops
from conftest import ROOT

ON_CUDA = pytest.mark.skipif(not fused_ops.KERNELS, reason="the fused kernels are CUDA only")


def reference_softcap_loss(logits, targets, cap):
    capped = cap * mx.tanh(logits.astype(mx.float32) / cap)
    return mx.logsumexp(capped, axis=-1) - mx.take_along_axis(capped, targets[..., None], axis=-1)[..., 0]


def softcap_case(dtype, vocab=1000):
    """(op, float32 reference, input) for softcap_cross_entropy."""
    mx.random.seed(3)
    logits = (8 * mx.random.normal((3, 7, vocab))).astype(dtype)  # large enough for the softcap to bend them
    targets = mx.random.randint(0, vocab, (3, 7))
    return (lambda x: fused_ops.softcap_cross_entropy(x, targets, 15.0),
            lambda x: reference_softcap_loss(x, targets, 15.0), logits)


def reference_norm_rotary(x):
    """mx.fast.rope wants (B, H, T, D)."""
    normed = mx.fast.rms_norm(x.astype(mx.float32), None, 1e-6).transpose(0, 2, 1, 3)
    return mx.fast.rope(normed, x.shape[-1], traditional=False, base=10000.0, scale=1.0, offset=0).transpose(0, 2, 1, 3)


def rotary_tables(T, D):
    """cos and sin (T, D/2) of the rotary angles, base 10000, as mx.fast.rope uses them."""
    half = D // 2
    angles = mx.arange(T, dtype=mx.float32)[:, None] * 10000.0 ** (-mx.arange(half, dtype=mx.float32) / half)
    return mx.cos(angles), mx.sin(angles)


def rotary_case(dtype, D=128):
    """(op, float32 reference, input) for norm_rotary; the input is a strided slice, as in train.py."""
    mx.random.seed(4)
    qkv = (3 * mx.random.normal((2, 16, 3, 2, D))).astype(dtype)  # (B, T, q/k/v, H, D)
    cos, sin = rotary_tables(16, D)
    return lambda x: fused_ops.norm_rotary(x, cos, sin), reference_norm_rotary, qkv[:, :, 1]


def embedding_case(dtype, vocab=50, dim=64):
    """(op, float32 reference, input) for embedding_lookup: a float32 table looked up into `dtype` rows, with
    few distinct ids, so that every used row's gradient sums many contributions."""
    mx.random.seed(5)
    idx = mx.random.randint(0, 7, (3, 40))
    return (lambda w: fused_ops.embedding_lookup(w, idx, dtype), lambda w: w[idx], mx.random.normal((vocab, dim)))


def reference_rms_norm(x):
    x = x.astype(mx.float32)
    return x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + 1e-6)


def rms_norm_case(dtype):
    """(op, float32 reference, input) for rms_norm."""
    mx.random.seed(7)
    return fused_ops.rms_norm, reference_rms_norm, (2 * mx.random.normal((3, 5, 512))).astype(dtype)


# op name -> (case, output dtype for an input dtype, atol in bfloat16, atol of the compiled op in bfloat16)
FUSED_OPS = {"softcap_cross_entropy": (softcap_case, lambda dtype: mx.float32, 2e-2, 1e-3),
             "norm_rotary": (rotary_case, lambda dtype: dtype, 5e-2, 5e-2),
             "embedding_lookup": (embedding_case, lambda dtype: dtype, 5e-2, 1e-2),
             "rms_norm": (rms_norm_case, lambda dtype: dtype, 5e-2, 5e-2)}


def check_fused_op(name, dtype, atol):
    """The op matches its reference, and so does its gradient under a random cotangent."""
    case, out_dtype, _, _ = FUSED_OPS[name]
    fn, reference, x = case(dtype)
    out, expected = fn(x), reference(x)
    assert out.shape == expected.shape and out.dtype == out_dtype(dtype)
    assert mx.allclose(out.astype(mx.float32), expected, atol=atol).item()
    weights = mx.random.normal(expected.shape)
    grad = mx.grad(lambda x: (fn(x).astype(mx.float32) * weights).sum())(x)
    expected_grad = mx.grad(lambda x: (reference(x) * weights).sum())(x)
    assert grad.dtype == x.dtype
    assert mx.allclose(grad.astype(mx.float32), expected_grad.astype(mx.float32), atol=atol).item()


@pytest.mark.parametrize("name", FUSED_OPS)
def test_fused_op_matches_its_formula(name):
    check_fused_op(name, mx.float32, atol=1e-4)


@pytest.mark.parametrize("name", FUSED_OPS)
def test_mlx_ops_path_matches_its_formula(name):
    """The path Metal and CPU take, checked on every machine (on CUDA too), and the switch restored after."""
    before = fused_ops.KERNELS
    with fused_ops.mlx_ops_only():
        assert fused_ops.KERNELS is False
        check_fused_op(name, mx.float32, atol=1e-4)
    assert fused_ops.KERNELS == before


def test_embedding_lookup_rows_and_float32_gradient():
    weight = mx.random.normal((50, 8))
    idx = mx.random.randint(0, 5, (4, 30))  # few ids: every row is gathered many times
    cotangent = mx.random.normal((4, 30, 8)).astype(mx.bfloat16)
    (expected,), (expected_grad,) = mx.vjp(lambda w: w[idx].astype(mx.bfloat16), [weight], [cotangent])
    (out,), (grad,) = mx.vjp(lambda w: fused_ops.embedding_lookup(w, idx, mx.bfloat16), [weight], [cotangent])
    assert out.dtype == mx.bfloat16 and grad.dtype == mx.float32
    assert mx.array_equal(out, expected).item()
    assert mx.allclose(grad, expected_grad, atol=1e-5).item()
    assert mx.all(grad[5:] == 0).item()  # rows never looked up get no gradient


@ON_CUDA
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("name", FUSED_OPS)
def test_fused_op_cuda_kernel(name, dtype):
    case, _, bf16_atol, compiled_atol = FUSED_OPS[name]
    check_fused_op(name, dtype, atol=1e-4 if dtype == mx.float32 else bf16_atol)
    fn, reference, x = case(dtype)
    assert mx.allclose(mx.compile(fn)(x).astype(mx.float32), reference(x), atol=compiled_atol).item()


@ON_CUDA
def test_kernels_are_compiled_once_and_kept_on_disk(tmp_path):
    """The cross-entropy and embedding kernels: compiled once per template by fused_ops (not by MLX in every
    process), the cubin kept in the kernel cache, and what a second process loads gives the same numbers."""
    env = {**os.environ, "MLX_PTX_CACHE_DIR": str(tmp_path)}
    script = ("import fused_ops, mlx.core as mx\n"
              "logits = mx.random.normal((64, 512), key=mx.random.key(0)).astype(mx.bfloat16)\n"
              "targets = mx.arange(64) % 512\n"
              "loss = fused_ops.softcap_cross_entropy(logits, targets, 15.0)\n"
              "grad = mx.grad(lambda l: fused_ops.softcap_cross_entropy(l, targets, 15.0).sum())(logits)\n"
              "rows = fused_ops.embedding_lookup(logits.astype(mx.float32), targets, mx.bfloat16)\n"
              "kernels = fused_ops._softcap_ce_kernels() + fused_ops._embedding_kernels()\n"
              "assert all(k.fallback is None for k in kernels), [k.name for k in kernels if k.fallback]\n"
              "print(loss.sum().item(), grad.astype(mx.float32).abs().sum().item(), rows.sum().item())\n")
    run = lambda: subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)  # noqa: E731
    first = run()
    assert first.returncode == 0, first.stderr
    kept = sorted(p.name for p in (tmp_path / "fused_ops").iterdir())
    assert len(kept) == 3 and all(name.endswith(".cubin") for name in kept)  # CE forward and backward, lookup
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "fused_ops").iterdir()}
    second = run()
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "fused_ops").iterdir()} == stamps  # read, not rebuilt


@ON_CUDA
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("layout", ["contiguous", "last axis strided"])
def test_norm_rotary_kernel_head_sizes_and_strides(D, layout):
    """The kernel's vector loads (D a multiple of 128) and its scalar path (D = 64, or a strided last axis)."""
    mx.random.seed(6)
    B, T, H = 2, 16, 3
    x = mx.random.normal((B, T, H, D) if layout == "contiguous" else (B, T, D, H)).astype(mx.bfloat16)
    if layout != "contiguous":
        x = x.transpose(0, 1, 3, 2)
    cos, sin = rotary_tables(T, D)
    weights = mx.random.normal(x.shape)
    grad = mx.grad(lambda x: (fused_ops.norm_rotary(x, cos, sin).astype(mx.float32) * weights).sum())(x)
    expected_grad = mx.grad(lambda x: (reference_norm_rotary(x) * weights).sum())(x)
    assert mx.allclose(fused_ops.norm_rotary(x, cos, sin).astype(mx.float32), reference_norm_rotary(x), atol=5e-2).item()
    assert mx.allclose(grad.astype(mx.float32), expected_grad.astype(mx.float32), atol=5e-2).item()
