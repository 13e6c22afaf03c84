"""Tests for train.py: model unit tests in-process, and real (short) training runs as subprocesses."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import prepare
import train
from mlx.utils import tree_flatten, tree_unflatten
from conftest import ROOT

SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth", "eval_tokens"]
VOCAB = 256


def tiny_config(n_layer=2, window_pattern="SSSL", sequence_len=32):
    return train.GPTConfig(vocab_size=VOCAB, sequence_len=sequence_len, n_layer=n_layer, n_head=2, head_dim=16,
                           window_pattern=window_pattern)


def tiny_model(**kwargs):
    mx.random.seed(0)
    model = train.GPT(tiny_config(**kwargs))
    model.init_weights()
    return model


def run_train(script, cache, budget, eval_tokens, timeout=180):
    env = dict(os.environ, AUTORESEARCH_CACHE=cache, AUTORESEARCH_TIME_BUDGET=str(budget),
               AUTORESEARCH_EVAL_TOKENS=str(eval_tokens), PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, script], cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                          timeout=timeout)


def parse_summary(stdout):
    assert "\n---\n" in stdout, stdout
    summary = stdout.split("\n---\n", 1)[1]
    values = dict(re.findall(r"^(\w+):\s+(\S+)$", summary, flags=re.MULTILINE))
    assert list(values) == SUMMARY_KEYS, summary
    return {key: float(value) for key, value in values.items()}


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

def test_importing_train_has_no_side_effects(tmp_path):
    """Importing train.py (as the tests and benchmarks do) prints nothing, reads no data and writes no files:
    training starts only from main()."""
    cache = tmp_path / "empty-cache"  # no data: a training run would fail at once
    result = subprocess.run([sys.executable, "-c", "import train; print(train.main.__name__)"], cwd=tmp_path,
                            env=dict(os.environ, AUTORESEARCH_CACHE=str(cache), PYTHONPATH=ROOT),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "main\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not even the cache folder


def test_output_shapes():
    model = tiny_model()
    idx = mx.random.randint(0, VOCAB, (3, 32))
    assert model(idx).shape == (3, 32, VOCAB)
    loss = model(idx, targets=idx)
    assert loss.shape == () and loss.dtype == mx.float32
    per_token = model(idx, targets=idx, reduction="none")
    assert per_token.shape == (3, 32) and per_token.dtype == mx.float32
    assert abs(per_token.mean().item() - loss.item()) < 1e-4


def test_untrained_loss_is_near_uniform():
    model = tiny_model()
    idx = mx.random.randint(0, VOCAB, (4, 32))
    assert abs(model(idx, targets=idx).item() - math.log(VOCAB)) < 0.1


def test_logits_are_softcapped():
    model = tiny_model()
    model.lm_head.weight = 100 * model.lm_head.weight  # large logits
    logits = model(mx.random.randint(0, VOCAB, (2, 32)))
    assert mx.abs(logits).max().item() <= train.LOGIT_SOFTCAP


def random_attention():
    """An attention layer with random weights (init zeroes c_proj, which would hide everything)."""
    mx.random.seed(0)
    attn = train.CausalSelfAttention(tiny_config(), layer=0)
    for linear in (attn.c_q, attn.c_k, attn.c_v, attn.c_proj):
        linear.weight = mx.random.normal(linear.weight.shape) * 0.2
    return attn


def attend(attn, x, window):
    return attn(x, None, window, train.rotary_tables(x.shape[1], attn.head_dim))


@pytest.mark.parametrize("window,block", [(8, 8), (8, 3), (5, 4), (16, 4), (32, 4)])
def test_blocked_sliding_window_equals_the_masked_one(monkeypatch, window, block):
    monkeypatch.setattr(train, "SLIDING_BLOCK", block)
    B, T, H, D = 2, 24, 2, 8
    q, k, v, cotangent = (mx.random.normal((B, T, H, D)) for _ in range(4))
    i, j = mx.arange(T)[:, None], mx.arange(T)[None, :]
    mask = (j <= i) & (j > i - window)  # query i sees keys i - window < j <= i
    heads = lambda t: t.transpose(0, 2, 1, 3)  # noqa: E731

    def masked(q, k, v):
        return heads(mx.fast.scaled_dot_product_attention(heads(q), heads(k), heads(v), scale=D ** -0.5, mask=mask))
    # same output, and the same gradients through the query blocks and the key/value slices
    (expected,), expected_grads = mx.vjp(masked, [q, k, v], [cotangent])
    (out,), grads = mx.vjp(lambda q, k, v: train.attention(q, k, v, window), [q, k, v], [cotangent])
    assert mx.allclose(out, expected, atol=1e-5).item()
    for grad, expected_grad in zip(grads, expected_grads):
        assert mx.allclose(grad, expected_grad, atol=1e-5).item()


@pytest.mark.parametrize("ranges", [[(0, 8), (4, 12), (8, 16)], [(2, 5)], [(0, 16), (3, 9), (3, 4)]])
def test_sequence_slices_value_and_gradient(ranges):
    x = mx.random.normal((2, 16, 3, 4))
    cotangents = [mx.random.normal((2, last - first, 3, 4)) for first, last in ranges]
    plain = lambda x: tuple(x[:, first:last] for first, last in ranges)  # noqa: E731
    expected, (expected_grad,) = mx.vjp(plain, [x], cotangents)
    out, (grad,) = mx.vjp(lambda x: train.sequence_slices(x, ranges), [x], cotangents)
    assert all(mx.array_equal(a, b).item() for a, b in zip(out, expected))
    assert grad.shape == x.shape and mx.allclose(grad, expected_grad, atol=1e-6).item()


ACTIVATIONS = {"relu_squared": lambda x: mx.square(mx.maximum(x, 0)), "gelu": nn.gelu, "silu": nn.silu}


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_an_elementwise_activation_has_autodiffs_value_and_gradient(name, dtype):
    plain = ACTIVATIONS[name]
    wrapped = train.relu_squared if name == "relu_squared" else train.elementwise(plain)
    x = mx.concatenate([mx.random.normal((1000,)), mx.zeros((4,))]).astype(dtype)
    cotangent = mx.random.normal(x.shape).astype(dtype)
    (expected,), (expected_grad,) = mx.vjp(plain, [x], [cotangent])
    tolerance = 1e-6 if dtype == mx.float32 else 1e-2
    eager = lambda x, c: mx.vjp(wrapped, [x], [c])  # noqa: E731
    # compiled too: there the recomputation must not be merged with the forward's ops
    for vjp in (eager, mx.compile(eager)):
        (out,), (grad,) = vjp(x, cotangent)
        assert out.dtype == grad.dtype == dtype
        assert mx.allclose(out, expected, atol=tolerance, rtol=tolerance).item()
        assert mx.allclose(grad, expected_grad, atol=tolerance, rtol=tolerance).item()


def test_unstack_value_and_gradient():
    v, weights = mx.random.normal((5,)), mx.random.normal((5,))
    loss = lambda parts: sum(w * part for w, part in zip(weights, parts))  # noqa: E731
    parts = train.unstack(v)
    assert len(parts) == 5 and all(part.shape == () and part.item() == v[i].item() for i, part in enumerate(parts))
    grad = mx.grad(lambda v: loss(train.unstack(v)))(v)
    assert mx.allclose(grad, weights).item()


def test_chunked_attention_is_causal_within_each_chunk(monkeypatch):
    monkeypatch.setattr(train, "SHORT_WINDOW", "chunked")
    chunk, T = 4, 16
    attn = random_attention()
    x = mx.random.normal((2, T, attn.n_head * attn.head_dim))
    y = attend(attn, x, chunk)
    for c in range(T // chunk):  # each chunk alone, as its own sequence, gives the same output
        part = x[:, c * chunk:(c + 1) * chunk]
        assert mx.allclose(y[:, c * chunk:(c + 1) * chunk], attend(attn, part, chunk), atol=1e-5).item()


def test_window_pattern_and_value_embeddings():
    config = tiny_config(n_layer=6)
    short, full = config.sequence_len // 2, config.sequence_len
    assert train.window_sizes(config) == [short, short, short, full, short, full]  # SSSL SS, last forced to L
    has_ve = [train.has_value_embedding(i, 6) for i in range(6)]
    assert has_ve == [False, True, False, True, False, True]  # alternating, last layer included
    model = train.GPT(config)
    assert ["value_embed" in block for block in model.blocks] == has_ve


def test_model_dim_rounds_up_to_whole_heads():
    config = train.config_for_depth(3, aspect_ratio=64, head_dim=128)
    assert config.n_embd == 256 and config.n_head == 2


def test_sliding_window_limits_attention(monkeypatch):
    monkeypatch.setattr(train, "SLIDING_BLOCK", 3)
    window, T = 4, 16
    attn = random_attention()
    x = mx.random.normal((1, T, attn.n_head * attn.head_dim))
    x_changed = mx.concatenate([x[:, :1] + 1.0, x[:, 1:]], axis=1)  # change token 0 only
    diff = mx.abs(attend(attn, x, window) - attend(attn, x_changed, window)).max(axis=-1)[0]
    assert (diff[:window] > 1e-4).all().item()  # positions that see token 0 change...
    assert (diff[window:] == 0).all().item()  # ...and the ones beyond the window do not
    # a full causal window sees token 0 everywhere
    diff_full = mx.abs(attend(attn, x, T) - attend(attn, x_changed, T)).max(axis=-1)[0]
    assert (diff_full > 1e-4).all().item()


def test_model_is_causal():
    model = tiny_model()
    for block in model.blocks:  # zero-initialised projections would hide any leak
        block.attn.c_proj.weight = mx.random.normal(block.attn.c_proj.weight.shape) * 0.1
    idx = mx.random.randint(0, VOCAB, (1, 32))
    changed = mx.concatenate([idx[:, :20], (idx[:, 20:] + 1) % VOCAB], axis=1)
    assert mx.allclose(model(idx)[:, :20], model(changed)[:, :20], atol=1e-5).item()


@pytest.mark.parametrize("matrix_optimizer", ["adamw", "muon"])
def test_optimizer_steps_lower_the_loss(monkeypatch, matrix_optimizer):
    monkeypatch.setattr(train, "MATRIX_OPTIMIZER", matrix_optimizer)
    model = tiny_model()
    optimizer = train.MuonAdamW(model)
    kinds = {kind for _, _, kind in optimizer.groups.values()}
    assert kinds == {"adamw", matrix_optimizer}
    idx = mx.random.randint(0, VOCAB, (2, 32))

    def loss_of(params):
        model.update(params)
        return model(idx, idx)
    losses = []
    for _ in range(3):
        params = model.trainable_parameters()
        loss, grads = mx.value_and_grad(loss_of)(params)
        model.update(params)
        optimizer.update(model, grads, train.schedule(0.0, 0))
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


# Builds a model of the given head count (width 16 x heads), with the optimizer settings of train.py or, given
# "edited", others, compiles the optimizer update as main() does, runs it once, and prints the names of the fused
# kernels MLX's CPU backend compiled (it keeps them under $TMPDIR/mlx).
_OPTIMIZER_KERNELS = """
import json, os, re, sys
import train  # first: prepare picks the CPU BLAS before mlx loads
import mlx.core as mx
from mlx.utils import tree_map
if sys.argv[2:] == ["edited"]:
    train.ADAM_BETAS, train.X0_ADAM_BETAS, train.ADAM_EPS = (0.9, 0.99), (0.9, 0.9), 1e-8
    train.MUON_BETA2, train.MUON_WEIGHT_DECAY, train.WEIGHT_DECAY = 0.9, 0.1, 0.05
for matrix_optimizer in ("muon", "adamw"):
    train.MATRIX_OPTIMIZER = matrix_optimizer
    config = train.GPTConfig(vocab_size=256, sequence_len=32, n_layer=2, n_head=int(sys.argv[1]), head_dim=16)
    model = train.GPT(config)
    model.init_weights()
    optimizer = train.MuonAdamW(model)
    state = [model.state, optimizer.state]
    step = mx.compile(lambda grads, s: optimizer.update(model, grads, s), inputs=state, outputs=state)
    step(tree_map(mx.ones_like, model.trainable_parameters()), train.schedule(0.5, 10))
    mx.eval(state)
names = set()
for _, _, files in os.walk(os.environ["TMPDIR"]):
    names |= {re.sub(r"_(contiguous|strided_\\d+)$", "", os.path.splitext(f)[0]) for f in files}
print(json.dumps(sorted(names)))
"""


@pytest.mark.slow
def test_optimizer_kernels_do_not_depend_on_the_width_or_the_settings(tmp_path):
    """MLX writes a fused kernel's float constants into its name, so a learning rate that depends on the width,
    or a beta, epsilon or weight decay written in as a Python float, would compile new optimizer kernels after
    every such edit (seconds each on CUDA)."""
    kernels = []
    for heads, settings in ((2, "as they are"), (4, "edited")):
        tmp = tmp_path / f"heads{heads}"
        tmp.mkdir()
        env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=ROOT)
        done = subprocess.run([sys.executable, "-c", _OPTIMIZER_KERNELS, str(heads), settings], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        kernels.append(set(json.loads(done.stdout.splitlines()[-1])))
    assert len(kernels[0]) >= 5  # the optimizer's fused kernels were found
    assert kernels[0] == kernels[1], f"first only: {kernels[0] - kernels[1]}; edited only: {kernels[1] - kernels[0]}"


def test_a_new_vector_parameter_without_a_group_is_named():
    model = tiny_model()
    model.mlp_lambdas = mx.ones((model.config.n_layer,))  # an agent's new per-layer scalars, no group for them
    with pytest.raises(ValueError, match=r"mlp_lambdas \(2,\) is not a matrix"):
        train.parameter_groups(model)


def test_orthogonalize_sets_singular_values_near_one():
    mx.random.seed(0)
    for shape in [(64, 16), (16, 64)]:  # tall and wide
        g = mx.random.normal(shape) * mx.linspace(0.1, 10, shape[1])  # condition number ~100
        s = np.linalg.svd(np.array(train.orthogonalize(g)), compute_uv=False)
        assert 0.6 < s.min() and s.max() < 1.25  # the quintics land near 1, not exactly on it


def test_lr_schedule():
    assert train.lr_multiplier(0.0) == pytest.approx(1.0 if train.WARMUP_RATIO == 0 else 0.0, abs=1e-6)
    assert train.lr_multiplier(1.0) == pytest.approx(train.FINAL_LR_FRAC)
    assert train.lr_multiplier(0.99) < train.lr_multiplier(1 - train.WARMDOWN_RATIO)


def untrained_val_bpb():
    """val_bpb of an untrained full-vocabulary model on the first rows of the validation shard."""
    mx.random.seed(0)
    model = train.GPT(train.GPTConfig(n_layer=1, n_head=1, head_dim=32))
    model.init_weights()
    return prepare.evaluate_bpb(model, prepare.Tokenizer.from_directory(), 2)[0]


def test_untrained_val_bpb_matches_uniform_prediction(use_cache, monkeypatch):
    """An untrained model predicts ~uniformly: val_bpb ~ log2(vocab) / (bytes per token) ~ 3.5 here."""
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 2 * prepare.MAX_SEQ_LEN)
    assert abs(untrained_val_bpb() - math.log2(prepare.VOCAB_SIZE) / 3.7) < 0.2


def test_val_bpb_from_logits_equals_the_training_loss_path(use_cache, monkeypatch):
    """evaluate_bpb scores train.py's logits itself; on this model it gives what the fused softcapped loss
    (the metric's old source) gives, to float precision."""
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 2 * prepare.MAX_SEQ_LEN)
    mx.random.seed(1)
    model = train.GPT(train.GPTConfig(n_layer=2, n_head=1, head_dim=64))
    model.init_weights()
    for name, p in tree_flatten(model.parameters()):  # trained-looking weights: confident, far from uniform
        if p.ndim == 2:
            model.update(tree_unflatten([(name, mx.random.normal(p.shape) * 0.5)]))
    tok = prepare.Tokenizer.from_directory()
    token_bytes = prepare.get_token_bytes()
    bpb, evaluated = prepare.evaluate_bpb(model, tok, 1)  # model(x): its logits, as train.py passes them
    x, y, _ = next(prepare.make_dataloader(tok, 2, prepare.MAX_SEQ_LEN, "val"))
    b = token_bytes[y]
    nats = mx.where(b > 0, model(x, targets=y, reduction="none"), 0.0).sum().item()
    reference = nats / (math.log(2) * b.sum().item())
    assert evaluated == 2 * prepare.MAX_SEQ_LEN
    assert reference > 4.0  # far from uniform (~3.5): the softcap and the logits matter
    assert bpb == pytest.approx(reference, rel=1e-5)


def confident_model(config):
    """train.py's GPT with random, trained-looking weights (confident, far from uniform)."""
    mx.random.seed(1)
    model = train.GPT(config)
    model.init_weights()
    for name, p in tree_flatten(model.parameters()):
        if p.ndim == 2:
            model.update(tree_unflatten([(name, mx.random.normal(p.shape) * 0.5)]))
    return model


def full_attention(q, k, v, window):
    """train.attention with the causal mask lost: every position sees every other."""
    heads = lambda t: t.transpose(0, 2, 1, 3)  # noqa: E731
    return heads(mx.fast.scaled_dot_product_attention(heads(q), heads(k), heads(v), scale=q.shape[-1] ** -0.5))


@pytest.mark.parametrize("short_window", ["sliding", "chunked"])
def test_the_model_passes_the_causality_check(monkeypatch, short_window):
    # evaluate_bpb's check on train.py's own model: the sliding band mask and the chunked windows are causal
    monkeypatch.setattr(train, "SHORT_WINDOW", short_window)
    model = confident_model(train.GPTConfig(n_layer=2, n_head=1, head_dim=32, window_pattern="SL"))
    x = mx.random.randint(0, prepare.VOCAB_SIZE - 1, (2, prepare.MAX_SEQ_LEN), key=mx.random.key(0))
    prepare.check_causal(model, x, model(x))
    monkeypatch.setattr(train, "attention", full_attention)  # the same model without its mask is caught
    with pytest.raises(ValueError, match="the model sees the future"):
        prepare.check_causal(model, x, model(x))

# ---------------------------------------------------------------------------
# End to end: train.py as the agent runs it
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_short_training_run_learns(prepared_cache):
    result = run_train(os.path.join(ROOT, "train.py"), prepared_cache, budget=15, eval_tokens=8 * prepare.MAX_SEQ_LEN)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Time budget: 15s" in out
    losses = [float(v) for v in re.findall(r"^step \d+ \| loss ([\d.]+)", out, flags=re.MULTILINE)]
    assert len(losses) >= 2 and losses[-1] < losses[0], out
    summary = parse_summary(out)
    assert all(math.isfinite(v) for v in summary.values()), summary
    assert summary["depth"] == train.DEPTH and summary["num_steps"] > train.UNTIMED_STEPS
    assert summary["eval_tokens"] == 8 * prepare.MAX_SEQ_LEN
    # an untrained model scores ~ln(vocab) nats per token: log2(vocab) / 3.7 bytes per token ~ 3.5 bits per byte
    assert summary["val_bpb"] < math.log2(prepare.VOCAB_SIZE) / 3.7 - 0.3, summary


@pytest.mark.slow
def test_nan_loss_stops_the_run(prepared_cache, tmp_path):
    source = Path(ROOT, "train.py").read_text()
    broken, count = re.subn(r"^EMBEDDING_LR = .*$", "EMBEDDING_LR = float('nan')", source, flags=re.MULTILINE)
    assert count == 1
    script = tmp_path / "train.py"
    script.write_text(broken)
    result = run_train(str(script), prepared_cache, budget=30, eval_tokens=prepare.MAX_SEQ_LEN)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert re.search(r"^error: loss is nan at step \d+", out, flags=re.MULTILINE), out
    assert "\n---\n" not in result.stdout and "val_bpb:" not in out
