"""
Pretrain a small GPT on MLX for a fixed wall-clock budget, then report val_bpb.
This is the one file the agent edits. Usage: uv run train.py
"""

import functools
import math
import sys
import time
from dataclasses import dataclass

# prepare must come before mlx: on Linux CPU it loads a fast BLAS that MLX can only pick up at import.
from prepare import (HARDWARE, MAX_SEQ_LEN, SEED, TIME_BUDGET, UNTIMED_STEPS, VOCAB_SIZE, Tokenizer,
                     describe_hardware, make_dataloader)
from fused_ops import custom_function, embedding_lookup, norm_rotary, rms_norm, softcap_cross_entropy
from scoring import report_step, score_model, start_clock
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

# ---------------------------------------------------------------------------
# Hyperparameters. A few defaults differ per backend: each such line shows all three values, and the backend
# prepare.py detected (printed first in the run's output) picks one. Edit the value of the backend you run on.
# ---------------------------------------------------------------------------

BACKEND = HARDWARE.backend   # "cuda", "metal" or "cpu"

# Model
DEPTH = {"cuda": 8, "metal": 4, "cpu": 2}[BACKEND]
ASPECT_RATIO = 64            # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128
WINDOW_PATTERN = "SSSL"      # per layer, cycled: S = half the context, L = all of it; the last layer is always L
SHORT_WINDOW = "sliding"     # S layers: "sliding" (each token sees the `window` tokens up to itself) or
                             # "chunked" (tokens see only their own window-sized chunk: one fused causal call, faster)
SLIDING_BLOCK = 512          # sliding windows attend in query blocks of this size, each against the keys in its reach
VALUE_EMBED_GATE_CHANNELS = 32
LOGIT_SOFTCAP = 15.0
# activations and matmuls; parameters stay float32. CPUs have no fast bfloat16 matmuls.
COMPUTE_DTYPE = {"cuda": mx.bfloat16, "metal": mx.bfloat16, "cpu": mx.float32}[BACKEND]

# Optimization: AdamW for embeddings, lm_head and scalars; Muon or AdamW for the block matrices
# rows of MAX_SEQ_LEN per forward/backward, from the device's memory: cuda 32 (60 GB and more), 16 (30 GB) or 8;
# metal 16 (32 GB) or 8; cpu 2 (twice the optimizer steps of 4 rows in 5 minutes, which learned more)
DEVICE_BATCH_SIZE = HARDWARE.device_batch_size
TOTAL_BATCH_SIZE = {"cuda": 2**19, "metal": 2**16, "cpu": 2**12}[BACKEND]  # tokens per optimizer step
EMBEDDING_LR = 0.6           # token and value embeddings
UNEMBEDDING_LR = 0.004       # lm_head
SCALAR_LR = 0.5              # x0 lambdas (the residual lambdas get 1% of it)
ADAM_BETAS = (0.8, 0.95)
X0_ADAM_BETAS = (0.96, 0.95) # the x0 lambdas average their gradients longer
ADAM_EPS = 1e-10
MATRIX_OPTIMIZER = "muon"    # attention and MLP matrices: "muon" (orthogonalised momentum) or "adamw"
MUON_LR = 0.04               # times sqrt(rows / cols) for tall matrices
MUON_MOMENTUM = (0.85, 0.95, 300)  # Nesterov momentum, ramped from the first value to the second over N steps
MUON_BETA2 = 0.95            # per-row (or per-column) second moment that evens out the update's scale (NorMuon)
MUON_WEIGHT_DECAY = 0.2      # cautious (only where update and weight agree in sign), fading linearly to 0
MATRIX_LR = 0.004            # the matrices' AdamW learning rate, when MATRIX_OPTIMIZER = "adamw"
WEIGHT_DECAY = 0.0           # the matrices' decoupled AdamW weight decay
WARMUP_RATIO = 0.0           # fractions of the time budget
WARMDOWN_RATIO = 0.5
FINAL_LR_FRAC = 0.0

# Bookkeeping (the first prepare.UNTIMED_STEPS steps compile the graphs: the clock starts after them)
LOG_EVERY_SECONDS = 5.0
MAX_LOSS = 100.0             # a loss above this (or not finite) stops the run

# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


@dataclass
class GPTConfig:
    vocab_size: int = VOCAB_SIZE
    sequence_len: int = MAX_SEQ_LEN
    n_layer: int = DEPTH
    n_head: int = 1
    head_dim: int = HEAD_DIM
    window_pattern: str = WINDOW_PATTERN

    @property
    def n_embd(self):
        return self.n_head * self.head_dim


def config_for_depth(depth, aspect_ratio=ASPECT_RATIO, head_dim=HEAD_DIM):
    model_dim = -(-depth * aspect_ratio // head_dim) * head_dim  # round up to whole heads
    return GPTConfig(n_layer=depth, n_head=model_dim // head_dim, head_dim=head_dim)


def norm(x):
    return rms_norm(x, 1e-6)  # no learned weight


def has_value_embedding(layer, n_layer):
    return layer % 2 == (n_layer - 1) % 2  # alternating layers, the last one included


def window_sizes(config):
    sizes = {"S": config.sequence_len // 2, "L": config.sequence_len}
    windows = [sizes[config.window_pattern[i % len(config.window_pattern)]] for i in range(config.n_layer)]
    windows[-1] = sizes["L"]
    return windows


def attention(q, k, v, window):
    """Causal attention of (B, T, H, D) queries, keys and values, each query seeing at most `window` keys
    (itself included); returns (B, T, H, D). The kernels take (B, H, T, D) views of the same memory."""
    T, scale = q.shape[1], q.shape[-1] ** -0.5

    def sdpa(q, k, v, mask):
        heads = lambda t: t.transpose(0, 2, 1, 3)  # noqa: E731
        return heads(mx.fast.scaled_dot_product_attention(heads(q), heads(k), heads(v), scale=scale, mask=mask))

    if window >= T:
        return sdpa(q, k, v, "causal")
    if SHORT_WINDOW == "chunked" and T % window == 0:
        B, _, H, D = q.shape
        fold = lambda t: t.reshape(B * T // window, window, H, D)  # noqa: E731  (chunks into the batch)
        return sdpa(fold(q), fold(k), fold(v), "causal").reshape(B, T, H, D)
    # Sliding window without a T x T mask, whose kernel would do (and differentiate) all T x T scores: the
    # first `window` queries see every key before them; each later block of queries gets the window+block
    # keys in its reach and one small band mask (query i sees block key j iff i < j <= i + window). The mask
    # is additive (0 or -inf) in q's dtype: a boolean one would be converted to that at its broadcast size,
    # (B, H, block, window + block), every layer. Keys and values are slices of k and v; the queries' pieces
    # come from a split (each piece a view, the gradient one concatenation).
    block = SLIDING_BLOCK
    starts = list(range(window, T, block))
    key_ranges = [(0, window)] + [(start - window, min(start + block, T)) for start in starts]
    k_pieces, v_pieces = sequence_slices(k, key_ranges), sequence_slices(v, key_ranges)
    i, j = mx.arange(block)[:, None], mx.arange(window + block)[None, :]
    band = mx.where((j > i) & (j <= i + window), 0.0, -math.inf).astype(q.dtype)
    outputs = []
    for n, (q_piece, k_piece, v_piece) in enumerate(zip(mx.split(q, starts, axis=1), k_pieces, v_pieces)):
        mask = "causal" if n == 0 else band[:q_piece.shape[1], :k_piece.shape[1]]
        outputs.append(sdpa(q_piece, k_piece, v_piece, mask))
    return mx.concatenate(outputs, axis=1)


def sequence_slices(x, ranges):
    """x[:, first:last] for each (first, last) of ranges, as views of x (no copies)."""
    return _sequence_slices(tuple(ranges), x.shape[1])(x)


@functools.cache
def _sequence_slices(ranges, T):
    # Autodiff would give each slice a gradient the size of x, zeros around the slice, and add them up. This
    # one adds the slices' overlapping gradients chunk by chunk (chunks cut at every range edge) and
    # concatenates the chunks once.
    edges = sorted({0, T} | {edge for r in ranges for edge in r})

    @custom_function
    def slices(x):
        return tuple(x[:, first:last] for first, last in ranges)

    @slices.vjp
    def slices_vjp(x, cotangents, outputs):
        chunks = []
        for a, b in zip(edges[:-1], edges[1:]):
            parts = [g[:, a - first:b - first] for g, (first, last) in zip(cotangents, ranges)
                     if first <= a and b <= last]
            chunks.append(sum(parts[1:], parts[0]) if parts else
                          mx.zeros((x.shape[0], b - a, *x.shape[2:]), cotangents[0].dtype))
        return mx.concatenate(chunks, axis=1)

    return slices


def unstack(v):
    """v[0], ..., v[n - 1] of an (n,) vector, with one stack for a gradient. Autodiff of n indexings (or of a
    split) adds n zero-filled vectors, an n-way sum that compile makes a new kernel for every DEPTH."""
    return _unstack(v.shape[0])(v)


@functools.cache
def _unstack(n):
    @custom_function
    def unstack(v):
        return tuple(v[i] for i in range(n))

    @unstack.vjp
    def unstack_vjp(v, cotangents, outputs):
        return mx.stack(cotangents)

    return unstack


def rotary_tables(T, head_dim, base=10000.0):
    """cos and sin (T, head_dim / 2) of the rotary embedding's angles, position t times base^(-i / (head_dim / 2))."""
    inv_freq = base ** (-mx.arange(head_dim // 2, dtype=mx.float32) / (head_dim // 2))
    angles = mx.arange(T, dtype=mx.float32)[:, None] * inv_freq[None, :]
    return mx.cos(angles), mx.sin(angles)


class Linear(nn.Module):
    """y = x W^T without bias; float32 weight, cast to the activations' dtype."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.weight = mx.zeros((out_dim, in_dim))

    def __call__(self, x):
        return x @ self.weight.astype(x.dtype).T


class Embedding(nn.Module):
    def __init__(self, vocab_size, dim):
        super().__init__()
        self.weight = mx.zeros((vocab_size, dim))

    def __call__(self, idx):
        return embedding_lookup(self.weight, idx, COMPUTE_DTYPE)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        dim = config.n_embd
        self.c_q, self.c_k, self.c_v = Linear(dim, dim), Linear(dim, dim), Linear(dim, dim)
        self.c_proj = Linear(dim, dim)
        if has_value_embedding(layer, config.n_layer):
            self.ve_gate = Linear(VALUE_EMBED_GATE_CHANNELS, config.n_head)

    def __call__(self, x, value_embedding, window, rope_tables):
        B, T, C = x.shape
        # one matmul for q, k and v; everything stays (B, T, heads, head_dim), which needs no transposed copies
        w_qkv = mx.concatenate([self.c_q.weight, self.c_k.weight, self.c_v.weight]).astype(x.dtype)
        qkv = (x @ w_qkv.T).reshape(B, T, 3, self.n_head, self.head_dim)
        # split, not three slices: its gradient is one concatenation, where slices would each add a zero-filled copy
        q, k, v = (t.squeeze(2) for t in mx.split(qkv, 3, axis=2))
        if value_embedding is not None:
            # input-dependent gate in (0, 2), exactly 1 at init: how much of the token's value embedding to add
            gate = 2 * mx.sigmoid(self.ve_gate(x[..., :VALUE_EMBED_GATE_CHANNELS]))  # (B, T, n_head)
            v = v + gate[..., None] * value_embedding.reshape(B, T, self.n_head, self.head_dim)
        q, k = norm_rotary(q, *rope_tables), norm_rotary(k, *rope_tables)  # QK norm, then rotary embedding
        return self.c_proj(attention(q, k, v, window).reshape(B, T, C))


def elementwise(fn):
    """fn, an elementwise function, with its gradient recomputed from its input alone. Autodiff would keep fn's
    intermediates (each the size of the MLP's widest activation, per layer) and compile a kernel for each piece;
    this keeps only x, and a new fn compiles two kernels (forward, backward): GELU starts in ~17 s instead of ~20."""
    @custom_function
    def f(x):
        return fn(x)

    @f.vjp
    def f_vjp(x, cotangent, output):
        # a fresh node for x (a reshape is free): compile would merge the recomputation with the forward's ops
        x = x.reshape(-1).reshape(x.shape)
        return mx.vjp(fn, [x], [cotangent])[1][0]

    return f


@elementwise  # another activation: decorate it too, or wrap one, e.g. elementwise(nn.gelu)
def relu_squared(x):
    return mx.square(mx.maximum(x, 0))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def __call__(self, x):
        return self.c_proj(relu_squared(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)
        if has_value_embedding(layer, config.n_layer):
            self.value_embed = Embedding(config.vocab_size, config.n_embd)

    def __call__(self, x, idx, window, rope_tables):
        value_embedding = self.value_embed(idx) if "value_embed" in self else None
        x = x + self.attn(norm(x), value_embedding, window, rope_tables)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = Embedding(config.vocab_size, config.n_embd)
        self.blocks = [Block(config, i) for i in range(config.n_layer)]
        self.lm_head = Linear(config.n_embd, config.vocab_size)  # untied from wte
        self.resid_lambdas = mx.ones((config.n_layer,))
        self.x0_lambdas = mx.full((config.n_layer,), 0.1)
        self.windows = window_sizes(config)

    def init_weights(self):
        dim = self.config.n_embd
        bound = math.sqrt(3) / math.sqrt(dim)  # uniform with std 1/sqrt(dim)
        uniform = lambda p: mx.random.uniform(-bound, bound, p.shape)
        self.wte.weight = mx.random.normal(self.wte.weight.shape)  # std 1, normed right after
        self.lm_head.weight = 0.001 * mx.random.normal(self.lm_head.weight.shape)  # small: uniform first predictions
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                linear.weight = uniform(linear.weight)
            # zero output projections: every block starts as the identity
            block.attn.c_proj.weight = mx.zeros_like(block.attn.c_proj.weight)
            block.mlp.c_proj.weight = mx.zeros_like(block.mlp.c_proj.weight)
            if "value_embed" in block:
                block.value_embed.weight = uniform(block.value_embed.weight)
                block.attn.ve_gate.weight = mx.zeros_like(block.attn.ve_gate.weight)

    def __call__(self, idx, targets=None, reduction="mean"):
        rope_tables = rotary_tables(idx.shape[1], self.config.head_dim)
        x = x0 = norm(self.wte(idx))
        resid_lambdas = unstack(self.resid_lambdas.astype(x.dtype))
        x0_lambdas = unstack(self.x0_lambdas.astype(x.dtype))
        for i, block in enumerate(self.blocks):
            # learned mix of the residual stream and the embedding, per layer
            x = resid_lambdas[i] * x + x0_lambdas[i] * x0
            x = block(x, idx, self.windows[i], rope_tables)
        logits = self.lm_head(norm(x))
        if targets is None:
            return LOGIT_SOFTCAP * mx.tanh(logits.astype(mx.float32) / LOGIT_SOFTCAP)
        # cross-entropy in nats of the softcapped logits, LOGIT_SOFTCAP * tanh(logits / LOGIT_SOFTCAP), in float32
        losses = softcap_cross_entropy(logits, targets, LOGIT_SOFTCAP)
        return losses if reduction == "none" else losses.mean()

    def num_params(self):
        return sum(p.size for _, p in tree_flatten(self.parameters()))

    def flops_per_token(self):
        """Training FLOPs per token: 6 per matmul weight (embedding lookups are free) plus attention's
        QK^T and AV, 12 * dim * window per layer (counted over the full window, causal or not)."""
        embedding_params = sum(p.size for name, p in tree_flatten(self.parameters()) if is_embedding(name))
        attention = sum(12 * self.config.n_embd * min(w, self.config.sequence_len) for w in self.windows)
        return 6 * (self.num_params() - embedding_params) + attention

# ---------------------------------------------------------------------------
# Optimizer: AdamW with a learning rate per parameter group, Muon for the block matrices; float32 state
# ---------------------------------------------------------------------------


def is_embedding(name):
    return name.startswith("wte.") or name.endswith("value_embed.weight")


def parameter_groups(model):
    """Name -> (learning rate, weight decay, "adamw" or "muon") for every parameter; weight decay of Muon
    matrices is MUON_WEIGHT_DECAY, applied in the update."""
    lr_scale = (model.config.n_embd / 768) ** -0.5  # embedding LRs were tuned at width 768
    groups = {}
    for name, p in tree_flatten(model.parameters()):
        if is_embedding(name):
            groups[name] = (EMBEDDING_LR * lr_scale, 0.0, "adamw")
        elif name.startswith("lm_head."):
            groups[name] = (UNEMBEDDING_LR * lr_scale, 0.0, "adamw")
        elif name == "resid_lambdas":
            groups[name] = (SCALAR_LR * 0.01, 0.0, "adamw")
        elif name == "x0_lambdas":
            groups[name] = (SCALAR_LR, 0.0, "adamw")
        elif p.ndim != 2:
            raise ValueError(f"parameter_groups: {name} {tuple(p.shape)} is not a matrix, and only matrices get the "
                             "matrix optimizer: give it a learning rate above, as resid_lambdas has")
        elif MATRIX_OPTIMIZER == "muon":
            groups[name] = (MUON_LR, MUON_WEIGHT_DECAY, "muon")
        else:
            groups[name] = (MATRIX_LR, WEIGHT_DECAY, "adamw")
    return groups


# Polar Express (Amsel et al., 2025): a different odd quintic per iteration, chosen so that five iterations
# bring every singular value in (0, 1] close to 1; the plain Newton-Schulz quintic repeats one polynomial.
POLAR_EXPRESS_COEFFICIENTS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def frobenius_norm(x):
    return mx.sqrt(mx.sum(mx.square(x)))


def orthogonalize(g):
    """The nearest semi-orthogonal matrix to g, approximately (Muon's update direction): singular values land
    near 1, directions are kept. Iterates on the smaller Gram matrix, in the compute dtype."""
    x = g.astype(COMPUTE_DTYPE)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    # Frobenius norm >= spectral norm; the 2 % margin keeps bf16 rounding from pushing a singular value past 1
    x = x / (1.02 * frobenius_norm(x.astype(mx.float32)) + 1e-6).astype(x.dtype)
    for a, b, c in POLAR_EXPRESS_COEFFICIENTS:
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return (x.T if tall else x).astype(mx.float32)


def muon_momentum(step):
    start, end, ramp_steps = MUON_MOMENTUM
    return start + (end - start) * min(step / ramp_steps, 1.0)


class MuonAdamW:
    """AdamW for embeddings, lm_head and scalars; for the block matrices Muon (MATRIX_OPTIMIZER = "muon") or
    AdamW. Float32 state. Muon: Nesterov momentum, orthogonalised, each row (column, for wide matrices) scaled
    by its running RMS and the whole rescaled to the orthogonalised norm (NorMuon), cautious weight decay."""

    def __init__(self, model):
        self.groups = parameter_groups(model)
        params = tree_flatten(model.parameters())
        # every float setting the update reads is a state array, not a Python float: compile writes float constants
        # into its kernels, so each edit of one (and each width edit, which rescales the embedding rates) would
        # compile new kernels, seconds each on a GPU
        f32 = functools.partial(mx.array, dtype=mx.float32)
        self.state = {"step": f32(0.0),
                      "lr": {name: f32(self.groups[name][0]) for name, _ in params},
                      "weight_decay": {name: f32(self.groups[name][1]) for name, _ in params},
                      "settings": {"adam_betas": f32(ADAM_BETAS), "x0_adam_betas": f32(X0_ADAM_BETAS),
                                   "adam_eps": f32(ADAM_EPS), "muon_beta2": f32(MUON_BETA2)},
                      "m": {name: mx.zeros(p.shape, mx.float32) for name, p in params},
                      "v": {name: mx.zeros(self.second_moment_shape(name, p), mx.float32) for name, p in params}}

    def second_moment_shape(self, name, p):
        if self.groups[name][2] == "adamw":
            return p.shape
        rows, cols = p.shape
        return (rows, 1) if rows >= cols else (1, cols)

    def update(self, model, grads, schedule):
        """schedule: float32 (learning-rate multiplier, Muon momentum, weight-decay multiplier)."""
        lr_multiplier, momentum, wd_multiplier = schedule[0], schedule[1], schedule[2]
        step = self.state["step"] = self.state["step"] + 1
        settings = self.state["settings"]
        grads = dict(tree_flatten(grads))
        updated = []
        for name, p in tree_flatten(model.parameters()):
            g = grads[name].astype(mx.float32)
            kind = self.groups[name][2]
            lr, weight_decay = self.state["lr"][name] * lr_multiplier, self.state["weight_decay"][name]
            m, v = self.state["m"][name], self.state["v"][name]
            if kind == "muon":
                m = momentum * m + (1 - momentum) * g
                update = orthogonalize((1 - momentum) * g + momentum * m)  # Nesterov: look one step ahead
                rows, cols = p.shape
                # sum of squares, not the mean: the rescale to the orthogonalised norm below cancels any common
                # factor, and a mean's 1 / width would be compiled into the kernel (new kernels for every width)
                beta2 = settings["muon_beta2"]
                v = beta2 * v + (1 - beta2) * mx.sum(mx.square(update), axis=1 if rows >= cols else 0, keepdims=True)
                scaled = update * mx.rsqrt(mx.maximum(v, 1e-10))
                update = scaled * (frobenius_norm(update) / mx.maximum(frobenius_norm(scaled), 1e-10))
                decay = weight_decay * wd_multiplier * (update * p >= 0)  # cautious: only where both agree in sign
                lr = lr * max(1.0, rows / cols) ** 0.5
            else:
                beta1, beta2 = settings["x0_adam_betas" if name == "x0_lambdas" else "adam_betas"]
                m = beta1 * m + (1 - beta1) * g
                v = beta2 * v + (1 - beta2) * mx.square(g)
                update = (m / (1 - beta1 ** step)) / (mx.sqrt(v / (1 - beta2 ** step)) + settings["adam_eps"])
                decay = weight_decay
            self.state["m"][name], self.state["v"][name] = m, v
            updated.append((name, (p * (1 - lr * decay) - lr * update).astype(p.dtype)))
        model.update(tree_unflatten(updated))


def schedule(progress, step):
    """(learning-rate multiplier, Muon momentum, weight-decay multiplier) at a training-time fraction and step."""
    return mx.array([lr_multiplier(progress), muon_momentum(step), 1.0 - progress], dtype=mx.float32)


def lr_multiplier(progress):
    """Warmup, constant, then a linear warmdown to FINAL_LR_FRAC; progress = training time / budget."""
    if progress < WARMUP_RATIO:
        return (progress + 1e-8) / WARMUP_RATIO
    if progress < 1 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1 - progress) / WARMDOWN_RATIO
    return cooldown + (1 - cooldown) * FINAL_LR_FRAC

# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def compiled_loss_and_grad(model):
    """(x, y) -> (mean loss, gradients of the trainable parameters), compiled with the model state captured."""
    def loss_and_grad(x, y):
        params = model.trainable_parameters()

        def loss_of(p):
            model.update(p)
            return model(x, y)
        loss, grads = mx.value_and_grad(loss_of)(params)
        model.update(params)  # put back the arrays that differentiation swapped in
        return loss, grads
    return mx.compile(loss_and_grad, inputs=model.state)


def check_loss(loss, step):
    if not math.isfinite(loss) or loss > MAX_LOSS:
        print(f"error: loss is {loss} at step {step} (not finite or above {MAX_LOSS}), stopping. "
              "Lower the learning rates or undo the last change.", flush=True)
        sys.exit(1)


def main():
    t_script = time.time()
    print(f"Hardware: {describe_hardware()}")
    print(f"Time budget: {TIME_BUDGET:g}s")
    mx.random.seed(SEED)
    tokens_per_micro_step = DEVICE_BATCH_SIZE * MAX_SEQ_LEN
    assert TOTAL_BATCH_SIZE % tokens_per_micro_step == 0, \
        f"TOTAL_BATCH_SIZE {TOTAL_BATCH_SIZE} must be a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN = {tokens_per_micro_step}"
    grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_micro_step

    config = config_for_depth(DEPTH)
    model = GPT(config)
    model.init_weights()
    optimizer = MuonAdamW(model)
    mx.eval(model.parameters(), optimizer.state)
    num_params, flops_per_token = model.num_params(), model.flops_per_token()
    print(f"Model: depth {config.n_layer}, dim {config.n_embd}, {config.n_head} heads of {config.head_dim}, "
          f"windows {model.windows}, {num_params / 1e6:.2f}M params, {COMPUTE_DTYPE}")
    print(f"Batch: {TOTAL_BATCH_SIZE} tokens per step = {grad_accum_steps} x {DEVICE_BATCH_SIZE} rows x {MAX_SEQ_LEN}")

    tokenizer = Tokenizer.from_directory()
    train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train", seed=SEED)

    # Two compiled graphs: forward+backward of one micro-batch, and the optimizer update with the model
    # and optimizer state captured (updated in place). Micro-batch gradients are summed in between.
    micro_step = compiled_loss_and_grad(model)
    state = [model.state, optimizer.state]

    def update(grads, schedule_values):
        optimizer.update(model, tree_map(lambda g: g / grad_accum_steps, grads), schedule_values)
    optimizer_step = mx.compile(update, inputs=state, outputs=state)

    def train_step(progress, step):
        """One optimizer step; returns its mean loss, still lazy (nothing here waits for the device)."""
        loss, grads = 0.0, None
        for _ in range(grad_accum_steps):
            x, y, _ = next(train_loader)
            micro_loss, micro_grads = micro_step(x, y)
            loss = loss + micro_loss
            grads = micro_grads if grads is None else tree_map(mx.add, grads, micro_grads)
            mx.async_eval(loss, grads)
        optimizer_step(grads, schedule(progress, step))
        mx.async_eval(model.parameters(), optimizer.state)
        return loss / grad_accum_steps

    step, training_time, t_start = 0, 0.0, None
    unread = []  # (step, loss) dispatched but not read back yet
    smooth_loss, last_log = 0.0, (0.0, UNTIMED_STEPS)  # (training_time, step) at the last progress line
    while training_time < TIME_BUDGET:
        progress = training_time / TIME_BUDGET
        lrm = lr_multiplier(progress)
        unread.append((step, train_step(progress, step)))
        # Read losses one step late: the device starts the next step while the host waits for this one.
        # The compile steps are read at once, so that the clock starts after them.
        while len(unread) > (1 if step >= UNTIMED_STEPS else 0):
            loss_step, loss = unread.pop(0)
            loss = loss.item()
            check_loss(loss, loss_step)
            report_step(loss_step, loss)
            smooth_loss = 0.9 * smooth_loss + 0.1 * loss
            debiased_loss = smooth_loss / (1 - 0.9 ** (loss_step + 1))
        step += 1
        if step == UNTIMED_STEPS:
            t_start = time.time()
            start_clock()  # the harness times training from here, with its own clock
            print(f"Startup: {t_start - t_script:.1f}s (data, compile, {UNTIMED_STEPS} untimed steps)", flush=True)
        if t_start is not None:
            training_time = time.time() - t_start
        if step == UNTIMED_STEPS or training_time - last_log[0] >= LOG_EVERY_SECONDS or training_time >= TIME_BUDGET:
            tok_per_s = (step - last_log[1]) * TOTAL_BATCH_SIZE / max(training_time - last_log[0], 1e-9)
            mfu = 100 * flops_per_token * tok_per_s / HARDWARE.peak_flops
            print(f"step {step:05d} | loss {debiased_loss:.4f} | lrm {lrm:.2f} | {tok_per_s:,.0f} tok/s | "
                  f"mfu {mfu:.2f}% | remaining {max(0.0, TIME_BUDGET - training_time):.0f}s", flush=True)
            last_log = (training_time, step)
    for loss_step, loss in unread:
        check_loss(loss.item(), loss_step)
        report_step(loss_step, loss.item())
    training_time = time.time() - t_start

    # total_tokens_M and mfu count the timed steps only, not the compile steps
    timed_tokens = (step - UNTIMED_STEPS) * TOTAL_BATCH_SIZE
    # the trained model's forward pass goes to the fixed evaluation (scoring.py), which scores it in a process
    # of its own: the logits of (rows, MAX_SEQ_LEN) inputs, softcapped, float32
    t_eval = time.time()
    val_bpb, eval_tokens = score_model(lambda x: model(x))
    print(f"Scored: {time.time() - t_eval:.1f}s", flush=True)
    print("---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print(f"training_seconds: {training_time:.1f}")
    print(f"total_seconds:    {time.time() - t_script:.1f}")
    print(f"peak_vram_mb:     {mx.get_peak_memory() / 1024**2:.1f}")
    print(f"mfu_percent:      {100 * flops_per_token * timed_tokens / training_time / HARDWARE.peak_flops:.2f}")
    print(f"total_tokens_M:   {timed_tokens / 1e6:.1f}")
    print(f"num_steps:        {step}")
    print(f"num_params_M:     {num_params / 1e6:.1f}")
    print(f"depth:            {DEPTH}")
    print(f"eval_tokens:      {eval_tokens}")


if __name__ == "__main__":
    main()
