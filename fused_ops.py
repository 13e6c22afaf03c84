"""
Fused ops for train.py: one function per op, each a CUDA kernel or a faster CUDA path on NVIDIA GPUs, and the
same op as plain MLX ops everywhere else. Kernels that need no shapes are compiled once and kept on disk
(`_KeptKernel`); norm_rotary's goes through mx.fast.cuda_kernel. Fixed, like prepare.py: the agent calls
these functions from train.py but never edits them.

    norm_rotary(x, cos, sin)          QK norm + rotary embedding of (B, T, H, D) heads
    rms_norm(x)                       RMS norm without a learned weight
    softcap_cross_entropy(logits, y)  per-token loss of softcapped logits, float32
    embedding_lookup(weight, idx, dt) rows of a float32 table in dtype dt, float32 gradient

Each op is laid out as mlx-lm keeps its ops: kernel source, launcher, MLX-ops fallback, then the dispatcher.
`KERNELS` is the one switch between the two paths (on where prepare.HARDWARE says CUDA); `mlx_ops_only()` turns it
off for a block, for benchmarks and tests that compare the paths.

`custom_function` is mx.custom_function for train.py and these ops: a function with a gradient of its own. Inside
`plain_forward()` (scoring.py exporting the trained model's forward pass) it is the plain function, and every op
takes its MLX-ops path: MLX cannot export custom functions.
"""

import contextlib
import ctypes
import functools
import glob
import hashlib
import os
import tempfile
from pathlib import Path

import prepare  # noqa: F401  (before mlx: prepare.py picks the CPU BLAS that MLX then loads)
import mlx.core as mx
from data_cache import write_atomic

KERNELS = prepare.HARDWARE.backend == "cuda"  # CUDA kernels and CUDA paths; False: MLX ops only


@contextlib.contextmanager
def mlx_ops_only():
    """Run a block with every op on its MLX-ops path (what Metal and CPU run), whatever the hardware. Functions
    compiled with mx.compile inside the block keep the path they were traced with."""
    global KERNELS
    saved, KERNELS = KERNELS, False
    try:
        yield
    finally:
        KERNELS = saved


class custom_function:
    """mx.custom_function (decorate a function, then its gradient with @f.vjp), except inside plain_forward(),
    where calling it calls the function itself: the forward pass then holds only ops MLX can export."""

    def __init__(self, fun):
        self.fun, self.custom = fun, mx.custom_function(fun)
        functools.update_wrapper(self, fun)

    def vjp(self, fun):
        self.custom.vjp(fun)
        return fun

    def __call__(self, *args, **kwargs):
        return (self.fun if _PLAIN_FORWARD else self.custom)(*args, **kwargs)


_PLAIN_FORWARD = False


@contextlib.contextmanager
def plain_forward():
    """Trace a forward pass for export: custom functions are their plain functions and every op its MLX-ops path."""
    global _PLAIN_FORWARD
    saved = _PLAIN_FORWARD
    _PLAIN_FORWARD = True
    try:
        with mlx_ops_only():
            yield
    finally:
        _PLAIN_FORWARD = saved


_KERNEL_DTYPES = (mx.float32, mx.bfloat16, mx.float16)  # what the kernels below are built for

# Vectors of N elements for the kernels below: one 4- to 16-byte load or store where N elements are adjacent.
_VECTOR_HEADER = """
template <typename U, int N> struct alignas(N * sizeof(U)) Vec { U v[N]; };
// N elements `stride` apart as floats: one vector load when they are adjacent and the address allows
template <int N, typename U, typename S> __device__ inline void load_floats(const U* p, S stride, float* out) {
  if (stride == 1 && reinterpret_cast<size_t>(p) % sizeof(Vec<U, N>) == 0) {
    const Vec<U, N> v = *reinterpret_cast<const Vec<U, N>*>(p);
    for (int k = 0; k < N; k++) out[k] = static_cast<float>(v.v[k]);
  } else {
    for (int k = 0; k < N; k++) out[k] = static_cast<float>(p[k * stride]);
  }
}
template <int N, typename U> __device__ inline void store_floats(U* p, const float* in) {  // p: aligned, contiguous
  Vec<U, N> v;
  for (int k = 0; k < N; k++) v.v[k] = static_cast<U>(in[k]);
  *reinterpret_cast<Vec<U, N>*>(p) = v;
}
"""


# mx.fast.cuda_kernel compiles its source with NVRTC in every process and keeps nothing (MLX keeps only its own
# fused kernels on disk): ~1.6 s a kernel, ~9.6 s of every CUDA start-up for the six kernels below. So the four that
# need no shapes (cross-entropy, embedding) are compiled here once per template, their cubins kept beside MLX's
# kernel cache (MLX_PTX_CACHE_DIR, set by prepare.py), and launched with mx.fast.precompiled_cuda_kernel. If NVRTC
# or the cache is not there, they fall back to mx.fast.cuda_kernel: slower to start, the same kernels.
_CUDA_TYPES = {mx.float32: "float", mx.bfloat16: "__nv_bfloat16", mx.float16: "__half", mx.int32: "int",
               mx.uint32: "unsigned int"}
_KEPT_HEADER = "#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n"


@functools.cache
def _nvrtc():
    """(NVRTC library, its options for this GPU): the CUDA that MLX itself compiles with (its wheels' nvidia/
    folder, CUDA_HOME or /usr/local/cuda). Raises OSError where there is none."""
    site = os.path.dirname(os.path.dirname(mx.__file__))
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    roots = [*sorted(glob.glob(os.path.join(site, "nvidia", "*"))), home]
    includes = [os.path.join(r, "include") for r in roots if os.path.exists(os.path.join(r, "include", "cuda_bf16.h"))]
    files = [f for r in roots for f in sorted(glob.glob(os.path.join(r, "lib*", "libnvrtc.so*")))
             if "builtins" not in f]
    lib = None
    for name in ["libnvrtc.so.13", "libnvrtc.so.12", *files]:  # the one MLX loaded first, if any
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None or not includes:
        raise OSError("no NVRTC library or CUDA headers found")
    cuda = ctypes.CDLL("libcuda.so.1")
    device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if (cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(device), 0)
            or cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # compute capability, major
            or cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)):  # and minor
        raise OSError("the CUDA driver did not give the GPU's compute capability")
    arch = f"sm_{major.value}{minor.value}{'a' if major.value >= 9 else ''}"  # as MLX compiles for it
    return lib, [f"--gpu-architecture={arch}", f"--include-path={includes[0]}", "-std=c++17"]


def _compile_cubin(name, source):
    """Compile CUDA source with NVRTC: the cubin's bytes (the kernel `name`, extern "C")."""
    lib, options = _nvrtc()
    prog = ctypes.c_void_p()
    check = lambda code, what: code == 0 or (_ for _ in ()).throw(RuntimeError(f"{what} failed ({code})"))  # noqa: E731
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None, None), "create")
    try:
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        if lib.nvrtcCompileProgram(prog, len(options), opts) != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC could not compile {name}: {log.value.decode(errors='replace')[:2000]}")
        size = ctypes.c_size_t()
        check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetCUBIN(prog, cubin), "cubin")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


class _KeptKernel:
    """A drop-in for mx.fast.cuda_kernel(name, input_names, output_names, source, header, ensure_row_contiguous):
    the same body and call, compiled once per template and kept on disk. The precompiled call passes pointers
    only, so a body that reads `<input>_shape` or `_strides` (norm_rotary's) stays with mx.fast.cuda_kernel."""

    def __init__(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True):
        self.name, self.inputs, self.outputs = name, input_names, output_names
        self.source, self.header, self.ensure_row_contiguous = source, header, ensure_row_contiguous
        assert not any(f"{n}_shape" in source or f"{n}_strides" in source for n in input_names), \
            "a precompiled kernel gets no shapes or strides: use mx.fast.cuda_kernel"
        self.cubins, self.fallback = {}, None

    def kernel_source(self, func, inputs, template, output_dtypes):
        params = [f"const {_CUDA_TYPES[a.dtype]}* {n}" for n, a in zip(self.inputs, inputs)]
        params += [f"{_CUDA_TYPES[d]}* {n}" for n, d in zip(self.outputs, output_dtypes)]
        constants = [f"  using {k} = {_CUDA_TYPES[v]};" if isinstance(v, mx.Dtype) else
                     f"  constexpr {'bool' if isinstance(v, bool) else 'int'} {k} = {str(v).lower()};"
                     for k, v in template]
        return (_KEPT_HEADER + self.header + f'\nextern "C" __global__ void {func}(' + ", ".join(params) + ") {\n" +
                "\n".join(constants) + "\n" + self.source + "\n}\n")

    def cubin(self, inputs, template, output_dtypes):
        key = (tuple((k, str(v)) for k, v in template), tuple((str(a.dtype), a.ndim) for a in inputs),
               tuple(map(str, output_dtypes)))
        if key not in self.cubins:
            func = f"{self.name}_{hashlib.sha256(repr(key).encode()).hexdigest()[:12]}"
            source = self.kernel_source(func, inputs, template, output_dtypes)
            digest = hashlib.sha256((source + repr(_nvrtc()[1])).encode()).hexdigest()[:16]
            path = os.path.join(os.environ.get("MLX_PTX_CACHE_DIR") or tempfile.gettempdir(), "fused_ops",
                                f"{func}_{digest}.cubin")
            try:
                with open(path, "rb") as f:
                    cubin = f.read()
            except OSError:
                cubin = _compile_cubin(func, source)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write_atomic(path, lambda tmp: Path(tmp).write_bytes(cubin))  # no half file if a run dies here
            self.cubins[key] = func, cubin
        return self.cubins[key]

    def __call__(self, inputs, template, grid, threadgroup, output_shapes, output_dtypes, init_value=None):
        if self.fallback is None:
            try:
                func, cubin = self.cubin(inputs, template, output_dtypes)
                return mx.fast.precompiled_cuda_kernel(
                    name=func, compiled_source=cubin, inputs=inputs, output_shapes=output_shapes,
                    output_dtypes=output_dtypes, scalars=[], grid=grid, threadgroup=threadgroup,
                    init_value=init_value, ensure_row_contiguous=self.ensure_row_contiguous)
            except Exception as e:  # no NVRTC, a compile error, an unwritable cache: MLX compiles it instead
                print(f"fused_ops: {self.name} falls back to mx.fast.cuda_kernel, compiled in every run "
                      f"({str(e).splitlines()[0][:200]})", flush=True)
                self.fallback = mx.fast.cuda_kernel(self.name, self.inputs, self.outputs, self.source,
                                                    header=self.header,
                                                    ensure_row_contiguous=self.ensure_row_contiguous)
        return self.fallback(inputs=inputs, template=template, grid=grid, threadgroup=threadgroup,
                             output_shapes=output_shapes, output_dtypes=output_dtypes, init_value=init_value)


# Softcapped cross-entropy, one thread block per row of logits. The forward pass keeps a running (max, sum of exp) per thread, merges
# them across the block and writes loss = lse - y[target] and lse; the backward pass recomputes the softcap
# from the bf16 logits instead of keeping float32 copies. Both read the logits once. At the H100 configuration
# (65,536 x 8192 logits) the loss head takes 4.9 ms forward+backward this way, 9.2 ms as MLX ops.
_SOFTCAP_CE_HEADER = """
// (m, s) = running max and sum of exp(y - m); m starts at -1e30, so empty partial sums merge as zeros
__device__ inline void merge_max_sum(float& m, float& s, float m2, float s2) {
  float mx = fmaxf(m, m2);
  s = s * __expf(m - mx) + s2 * __expf(m2 - mx);
  m = mx;
}
"""
_SOFTCAP_CE_FORWARD = """
  const int row = blockIdx.x;
  const T* x = logits + (size_t)row * V;
  const float c = cap[0], inv_c = 1.0f / cap[0];
  float m = -1e30f, s = 0.0f;
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    float y = c * tanhf(static_cast<float>(x[i]) * inv_c);
    merge_max_sum(m, s, y, 1.0f);
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    float m2 = __shfl_xor_sync(0xffffffff, m, offset), s2 = __shfl_xor_sync(0xffffffff, s, offset);
    merge_max_sum(m, s, m2, s2);
  }
  __shared__ float warp_m[32], warp_s[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  if (lane == 0) { warp_m[warp] = m; warp_s[warp] = s; }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < n_warps; w++) merge_max_sum(m, s, warp_m[w], warp_s[w]);
    float lse_row = m + logf(s);
    lse[row] = lse_row;
    loss[row] = lse_row - c * tanhf(static_cast<float>(x[targets[row]]) * inv_c);
  }
"""
_SOFTCAP_CE_BACKWARD = """
  const int row = blockIdx.x;
  const T* x = logits + (size_t)row * V;
  T* dx = dlogits + (size_t)row * V;
  const float c = cap[0], inv_c = 1.0f / cap[0], g = cotangent[row], l = lse[row];
  const int t = targets[row];
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    float th = tanhf(static_cast<float>(x[i]) * inv_c);
    float p = __expf(c * th - l) - (i == t ? 1.0f : 0.0f);
    dx[i] = static_cast<T>(g * p * (1.0f - th * th));
  }
"""
_CE_THREADS = 256


@functools.cache
def _softcap_ce_kernels():
    forward = _KeptKernel("softcap_ce_forward", ["logits", "targets", "cap"], ["loss", "lse"],
                                  _SOFTCAP_CE_FORWARD, header=_SOFTCAP_CE_HEADER)
    backward = _KeptKernel("softcap_ce_backward", ["logits", "targets", "cap", "lse", "cotangent"],
                                   ["dlogits"], _SOFTCAP_CE_BACKWARD)
    return forward, backward


@custom_function
def _softcap_ce_cuda(logits, targets, cap):
    """(rows, V) logits, (rows,) int32 targets, (1,) float32 cap -> per-row loss and logsumexp, float32."""
    rows, vocab = logits.shape
    forward, _ = _softcap_ce_kernels()
    return tuple(forward(inputs=[logits, targets, cap], template=[("T", logits.dtype), ("V", vocab)],
                         grid=(rows * _CE_THREADS, 1, 1), threadgroup=(_CE_THREADS, 1, 1),
                         output_shapes=[(rows,), (rows,)], output_dtypes=[mx.float32, mx.float32]))


@_softcap_ce_cuda.vjp
def _softcap_ce_cuda_vjp(primals, cotangents, outputs):
    logits, targets, cap = primals
    rows, vocab = logits.shape
    _, backward = _softcap_ce_kernels()
    dlogits = backward(inputs=[logits, targets, cap, outputs[1], cotangents[0].astype(mx.float32)],
                       template=[("T", logits.dtype), ("V", vocab)], grid=(rows * _CE_THREADS, 1, 1),
                       threadgroup=(_CE_THREADS, 1, 1), output_shapes=[logits.shape], output_dtypes=[logits.dtype])[0]
    return dlogits, mx.zeros_like(targets), mx.zeros_like(cap)


# RMS norm then rotary embedding of queries or keys, (B, T, H, D), one warp per (b, t, h) row: lane l holds
# VEC adjacent elements of each half, at i = VEC * l + 32 * VEC * p, and rotates the pairs (i, i + D/2). VEC = 2
# where D allows, so that loads and stores are 4 or 8 bytes wide. The backward pass recomputes the norm from x.
# At the H100 configuration the fused kernels save 12 ms of a 88 ms micro-batch against MLX ops (copies, norms
# and rotations of q and k).
_NORM_ROTARY_COMMON = """
  constexpr int HALF = D / 2, VEC = HALF % 64 == 0 ? 2 : 1, PAIRS = HALF / (32 * VEC);
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n_heads = x_shape[2], seq_len = x_shape[1];
  if (row >= x_shape[0] * seq_len * n_heads) return;
  const int h = row % n_heads, t = (row / n_heads) % seq_len, b = row / (n_heads * seq_len);
  const T* xr = x + b * x_strides[0] + t * x_strides[1] + h * x_strides[2];
  float x1[PAIRS][VEC], x2[PAIRS][VEC], cs[PAIRS][VEC], sn[PAIRS][VEC], sum_sq = 0.0f;
  for (int p = 0; p < PAIRS; p++) {
    const int i = VEC * lane + 32 * VEC * p;
    load_floats<VEC>(xr + i * x_strides[3], x_strides[3], x1[p]);
    load_floats<VEC>(xr + (i + HALF) * x_strides[3], x_strides[3], x2[p]);
    load_floats<VEC>(cos + t * HALF + i, 1, cs[p]);
    load_floats<VEC>(sin + t * HALF + i, 1, sn[p]);
    for (int v = 0; v < VEC; v++) sum_sq += x1[p][v] * x1[p][v] + x2[p][v] * x2[p][v];
  }
  for (int offset = 16; offset > 0; offset /= 2) sum_sq += __shfl_xor_sync(0xffffffff, sum_sq, offset);
  const float r = rsqrtf(sum_sq / D + eps[0]);
"""
_NORM_ROTARY_FORWARD = _NORM_ROTARY_COMMON + """
  T* o = out + (size_t)row * D;
  for (int p = 0; p < PAIRS; p++) {
    const int i = VEC * lane + 32 * VEC * p;
    float o1[VEC], o2[VEC];
    for (int v = 0; v < VEC; v++) {
      const float n1 = x1[p][v] * r, n2 = x2[p][v] * r;
      o1[v] = n1 * cs[p][v] - n2 * sn[p][v];
      o2[v] = n2 * cs[p][v] + n1 * sn[p][v];
    }
    store_floats<VEC>(o + i, o1);
    store_floats<VEC>(o + i + HALF, o2);
  }
"""
_NORM_ROTARY_BACKWARD = _NORM_ROTARY_COMMON + """
  const T* g = cotangent + (size_t)row * D;
  T* dx = dx_out + (size_t)row * D;
  float d1[PAIRS][VEC], d2[PAIRS][VEC], dot = 0.0f;
  for (int p = 0; p < PAIRS; p++) {  // rotate the gradient back, then through the norm
    const int i = VEC * lane + 32 * VEC * p;
    float g1[VEC], g2[VEC];
    load_floats<VEC>(g + i, 1, g1);
    load_floats<VEC>(g + i + HALF, 1, g2);
    for (int v = 0; v < VEC; v++) {
      d1[p][v] = g1[v] * cs[p][v] + g2[v] * sn[p][v];
      d2[p][v] = g2[v] * cs[p][v] - g1[v] * sn[p][v];
      dot += (d1[p][v] * x1[p][v] + d2[p][v] * x2[p][v]) * r;
    }
  }
  for (int offset = 16; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffff, dot, offset);
  dot /= D;
  for (int p = 0; p < PAIRS; p++) {
    const int i = VEC * lane + 32 * VEC * p;
    float o1[VEC], o2[VEC];
    for (int v = 0; v < VEC; v++) {
      o1[v] = r * (d1[p][v] - x1[p][v] * r * dot);
      o2[v] = r * (d2[p][v] - x2[p][v] * r * dot);
    }
    store_floats<VEC>(dx + i, o1);
    store_floats<VEC>(dx + i + HALF, o2);
  }
"""
_ROWS_PER_BLOCK = 8


@functools.cache
def _norm_rotary_kernels():
    inputs = ["x", "cos", "sin", "eps"]
    forward = mx.fast.cuda_kernel("norm_rotary_forward", inputs, ["out"], _NORM_ROTARY_FORWARD,
                                  header=_VECTOR_HEADER, ensure_row_contiguous=False)
    backward = mx.fast.cuda_kernel("norm_rotary_backward", inputs + ["cotangent"], ["dx_out"],
                                   _NORM_ROTARY_BACKWARD, header=_VECTOR_HEADER, ensure_row_contiguous=False)
    return forward, backward


def _norm_rotary_launch(kernel, inputs, x):
    B, T, H, D = x.shape
    rows = B * T * H
    threads = 32 * _ROWS_PER_BLOCK
    return kernel(inputs=inputs, template=[("T", x.dtype), ("D", D)], grid=(-(-rows // _ROWS_PER_BLOCK) * threads, 1, 1),
                  threadgroup=(threads, 1, 1), output_shapes=[x.shape], output_dtypes=[x.dtype])[0]


@custom_function
def _norm_rotary_cuda(x, cos, sin, eps):
    return _norm_rotary_launch(_norm_rotary_kernels()[0], [x, cos, sin, eps], x)


@_norm_rotary_cuda.vjp
def _norm_rotary_cuda_vjp(primals, cotangent, output):
    x, cos, sin, eps = primals
    # the kernels index rows through strides but read the cotangent as contiguous rows
    dx = _norm_rotary_launch(_norm_rotary_kernels()[1], [x, cos, sin, eps, mx.contiguous(cotangent)], x)
    return dx, mx.zeros_like(cos), mx.zeros_like(sin), mx.zeros_like(eps)


def norm_rotary(x, cos, sin, eps=1e-6):
    """RMS-normalise the heads of x, (B, T, H, D) with no learned weight, then apply the rotary embedding:
    each head's halves (x1, x2) turn into (x1 cos - x2 sin, x2 cos + x1 sin), with cos and sin (T, D/2) float32
    tables. One fused CUDA kernel (forward and backward) on NVIDIA GPUs; MLX ops elsewhere."""
    B, T, H, D = x.shape
    if KERNELS and D % 64 == 0:
        # x is read through its strides; the tables are indexed as contiguous (T, D/2) rows
        cos, sin = (mx.contiguous(table.astype(mx.float32)) for table in (cos, sin))
        return _norm_rotary_cuda(x, cos, sin, mx.array([eps], dtype=mx.float32))
    halves = mx.fast.rms_norm(x, None, eps).reshape(B, T, H, 2, D // 2)
    signed_sin = mx.stack([-sin, sin], axis=1)[:, None]  # (T, 1, 2, D/2): -sin for x1's new value, +sin for x2's
    rotated = halves * cos[:, None, None, :] + halves[..., ::-1, :] * signed_sin
    return rotated.astype(x.dtype).reshape(x.shape)


def rms_norm(x, eps=1e-6):
    """x / sqrt(mean(x^2) + eps) over the last axis, no learned weight. On NVIDIA GPUs through a weight of
    ones: MLX's CUDA backward pass has a fast kernel only for a norm with a weight (the weightless one took
    2-2.6 ms of a 57-59 ms micro-batch at the H100 configuration). Elsewhere no weight: computing its unused
    gradient would cost a reduction."""
    if KERNELS:
        return mx.fast.rms_norm(x, mx.ones((x.shape[-1],), x.dtype), eps)
    return mx.fast.rms_norm(x, None, eps)


def softcap_cross_entropy(logits, targets, softcap):
    """Cross-entropy in nats (float32, one per target) of softcap * tanh(logits / softcap), the softcap and the
    softmax computed in float32 whatever the logits' dtype. A fused CUDA kernel on NVIDIA GPUs; MLX ops elsewhere."""
    if KERNELS and logits.dtype in _KERNEL_DTYPES:
        vocab = logits.shape[-1]
        loss, _ = _softcap_ce_cuda(logits.reshape(-1, vocab), targets.reshape(-1).astype(mx.int32),
                                   mx.array([softcap], dtype=mx.float32))
        return loss.reshape(targets.shape)
    capped = softcap * mx.tanh(logits.astype(mx.float32) / softcap)
    return mx.fast.cross_entropy(capped, targets)


# Embedding lookup, one thread block per looked-up row, each thread 4 columns (the row width is read from the
# block size, not compiled in, so one kernel serves every model width). MLX's gather and float32
# scatter-add run at a fifth of the memory bandwidth for these shapes, after a float32 copy of the cotangent
# (5 tables of 8192 x 512 at the H100 configuration: 4.7 ms of a 62 ms micro-batch, 0.6 ms with these
# kernels). The backward kernel adds the rows' gradients with float32 atomics, 4 at a time on sm_90 and
# newer, straight from the bf16 cotangent.
_EMBEDDING_FORWARD = """
  const int row = blockIdx.x, c = 4 * threadIdx.x, id = idx[row], DIM = 4 * blockDim.x;
  Vec<T, 4> o;
  if (id >= 0 && id < V) {
    const Vec<W, 4> w = *reinterpret_cast<const Vec<W, 4>*>(weight + (size_t)id * DIM + c);
    for (int k = 0; k < 4; k++) o.v[k] = static_cast<T>(static_cast<float>(w.v[k]));
  } else {  // an id outside the table reads nothing: its row is zeros
    for (int k = 0; k < 4; k++) o.v[k] = static_cast<T>(0.0f);
  }
  *reinterpret_cast<Vec<T, 4>*>(out + (size_t)row * DIM + c) = o;
"""
_EMBEDDING_BACKWARD = """
  const int row = blockIdx.x, c = 4 * threadIdx.x, id = idx[row], DIM = 4 * blockDim.x;
  if (id < 0 || id >= V) return;
  const Vec<T, 4> g = *reinterpret_cast<const Vec<T, 4>*>(cotangent + (size_t)row * DIM + c);
  float* dst = grad + (size_t)id * DIM + c;
#if __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(dst), make_float4(static_cast<float>(g.v[0]), static_cast<float>(g.v[1]),
                                                        static_cast<float>(g.v[2]), static_cast<float>(g.v[3])));
#else
  for (int k = 0; k < 4; k++) atomicAdd(dst + k, static_cast<float>(g.v[k]));
#endif
"""


@functools.cache
def _embedding_kernels():
    forward = _KeptKernel("embedding_forward", ["weight", "idx"], ["out"], _EMBEDDING_FORWARD,
                                  header=_VECTOR_HEADER)
    backward = _KeptKernel("embedding_backward", ["idx", "cotangent"], ["grad"], _EMBEDDING_BACKWARD,
                                   header=_VECTOR_HEADER)
    return forward, backward


@functools.cache
def _embedding_lookup(dtype, use_kernel):
    """The lookup as a custom function for one output dtype, through the CUDA kernels or MLX ops."""

    @custom_function
    def lookup(weight, idx):
        if not use_kernel:
            return weight.astype(dtype)[idx]  # cast the table, then gather: no float32 rows to cast
        (vocab, dim), rows = weight.shape, idx.size
        return _embedding_kernels()[0](
            inputs=[weight, idx.reshape(-1).astype(mx.int32)],
            template=[("W", weight.dtype), ("T", dtype), ("V", vocab)],
            grid=(rows * dim // 4, 1, 1), threadgroup=(dim // 4, 1, 1), output_shapes=[(rows, dim)],
            output_dtypes=[dtype])[0].reshape(*idx.shape, dim)

    @lookup.vjp
    def lookup_vjp(primals, cotangent, output):
        weight, idx = primals
        (vocab, dim), rows = weight.shape, idx.size
        if not use_kernel:
            grad = mx.zeros(weight.shape, mx.float32).at[idx].add(cotangent.astype(mx.float32))
        else:
            grad = _embedding_kernels()[1](
                inputs=[idx.reshape(-1).astype(mx.int32), cotangent.reshape(rows, dim)],
                template=[("T", cotangent.dtype), ("V", vocab)], grid=(rows * dim // 4, 1, 1),
                threadgroup=(dim // 4, 1, 1), output_shapes=[weight.shape], output_dtypes=[mx.float32],
                init_value=0)[0]
        return grad.astype(weight.dtype), mx.zeros_like(idx)

    return lookup


def embedding_lookup(weight, idx, dtype):
    """Rows of a (V, dim) table for integer ids of any shape, cast to dtype: weight[idx].astype(dtype). The
    gradient sums each row's contributions in float32 (a frequent token's thousands of rows would swamp
    bfloat16) before casting to the table's dtype. CUDA kernels on NVIDIA GPUs; MLX ops elsewhere."""
    dim = weight.shape[-1]
    use_kernel = (KERNELS and dim % 4 == 0 and dim <= 4096 and weight.dtype in _KERNEL_DTYPES
                  and dtype in _KERNEL_DTYPES)
    return _embedding_lookup(dtype, use_kernel)(weight, idx)
