"""
How a run is scored, out of train.py's reach. train.py calls three functions of this module; the harness
(`autoresearch run`) reads what they send through a pipe of its own, timestamps it with its own clock, and scores
the handed-over model in a process that runs only fixed code and never train.py's:

    start_clock()            the training clock starts (after prepare.UNTIMED_STEPS compile steps)
    report_step(step, loss)  an optimizer step is done: the harness's step count, tok/s and loss curve
    score_model(forward)     hand over the trained model: its forward pass, weights included, is exported as an
                             MLX graph and scored by `evaluate`; returns (val_bpb, tokens evaluated)

    uv run scoring.py evaluate MODEL.mlxfn   the evaluation: the validation tokens and the tokenizer (token_bytes
                                             included) checked against the hashes prepare.py recorded, then
                                             prepare.evaluate_bpb on the exported graph

Without the harness (`uv run train.py`) the events go nowhere and score_model starts the evaluation process
itself. Fixed, like prepare.py. Nothing heavy is imported at module level: the test fixtures use this protocol too.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPORT_FD_ENV = "AUTORESEARCH_REPORT_FD"   # train.py -> harness: one JSON event a line
REPLY_FD_ENV = "AUTORESEARCH_REPLY_FD"     # harness -> train.py: the score, one JSON line
SCRATCH_ENV = "AUTORESEARCH_SCRATCH"       # the one folder a harness run may write, emptied before each run
MODEL_FILE = "model.mlxfn"


def _fd(name):
    value = os.environ.get(name)
    return int(value) if value else None


def _send(event, **fields):
    fd = _fd(REPORT_FD_ENV)
    if fd is not None:
        os.write(fd, (json.dumps({"event": event, **fields}) + "\n").encode())


def start_clock():
    """The training clock starts now: everything before it is start-up, which the harness allows a bounded time."""
    _send("clock")


def report_step(step, loss, tokens=None):
    """Optimizer step `step` is done with mean loss `loss`; `tokens` trained so far defaults to what the fixed
    dataloader handed out."""
    prepare = sys.modules.get("prepare")
    if tokens is None and prepare is not None:
        tokens = prepare.TOKENS_SERVED["train"]
    _send("step", step=int(step), loss=float(loss), tokens=tokens)


def hand_over(path, **facts):
    """Give the harness the model file at `path` and wait for its score: {"val_bpb", "eval_tokens", ...}."""
    _send("done", model=os.path.abspath(path), **facts)
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = os.read(_fd(REPLY_FD_ENV), 65536)
        if not chunk:
            raise SystemExit("scoring: the harness closed the channel before it sent the score")
        reply += chunk
    return json.loads(reply)


def export_forward(forward, path, shapes):
    """Write forward(inputs) -> logits, weights included, as an MLX graph traced at each (rows, seq) of `shapes`."""
    import mlx.core as mx
    from fused_ops import plain_forward
    try:
        with plain_forward(), mx.exporter(path, forward) as export:
            for shape in shapes:
                export(mx.zeros(shape, mx.int32))
    except ValueError as e:
        if "CustomTransforms" in str(e):
            raise ValueError("score_model: the forward pass calls a function made with mx.custom_function, which MLX "
                             "cannot export: make it with fused_ops.custom_function (the same decorator, skipped "
                             "when the model is handed over)") from None
        raise


def score_model(forward):
    """Hand the trained model to the fixed evaluation; returns (val_bpb, tokens evaluated). `forward(inputs)` must
    return the logits, (rows, MAX_SEQ_LEN, VOCAB_SIZE), for (rows, MAX_SEQ_LEN) int32 inputs."""
    import prepare
    import mlx.core as mx
    scratch = os.environ.get(SCRATCH_ENV) or tempfile.mkdtemp(prefix="autoresearch-model-")
    path = os.path.join(scratch, MODEL_FILE)
    export_forward(forward, path, prepare.eval_shapes(prepare.HARDWARE.eval_batch_size))
    facts = {"peak_memory_mb": mx.get_peak_memory() / 1024**2}
    mx.clear_cache()  # the evaluation runs in another process meanwhile: give it the memory
    if _fd(REPORT_FD_ENV) is not None:
        score = hand_over(path, **facts)
    else:
        try:
            score = evaluate_in_new_process(path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return score["val_bpb"], score["eval_tokens"]


def evaluate_in_new_process(path, command_prefix=(), **popen_kwargs):
    """Run `scoring.py evaluate` on a model file in a process of its own; returns its score. Its output passes
    through (popen_kwargs may redirect it); a failed evaluation raises RuntimeError with its last line."""
    read, write = os.pipe()
    command = [*command_prefix, sys.executable, os.path.abspath(__file__), "evaluate", path, "--result-fd", str(write)]
    with subprocess.Popen(command, pass_fds=(write,), **popen_kwargs) as proc:
        os.close(write)
        with os.fdopen(read, "rb") as f:
            result = f.read()
    if proc.returncode != 0 or not result:
        raise RuntimeError(f"the evaluation of {path} failed (exit code {proc.returncode})")
    return json.loads(result)


def evaluate(path):
    """The score of an exported forward pass: {"val_bpb", "eval_tokens", "check_seconds", "eval_seconds"}."""
    import prepare  # before mlx: it picks the CPU BLAS that MLX then loads
    import mlx.core as mx
    from token_shards import check_token_shards
    t0 = time.time()
    check_token_shards(verify_contents=True, splits=("val",))  # the tokenizer's fingerprint covers token_bytes
    checked = time.time()
    graph = mx.compile(mx.import_function(path))
    val_bpb, eval_tokens = prepare.evaluate_bpb(lambda x: graph(x)[0], prepare.Tokenizer.from_directory(),
                                                prepare.HARDWARE.eval_batch_size)
    return {"val_bpb": val_bpb, "eval_tokens": eval_tokens, "check_seconds": round(checked - t0, 3),
            "eval_seconds": round(time.time() - checked, 3)}


def main(argv=None, evaluate=evaluate):
    import argparse
    parser = argparse.ArgumentParser(description="Score an exported model (the harness runs this)")
    parser.add_argument("command", choices=["evaluate"])
    parser.add_argument("model", help="the .mlxfn file score_model wrote")
    parser.add_argument("--result-fd", type=int, help="write the score there as JSON (default: print it)")
    args = parser.parse_args(argv)
    try:
        score = evaluate(args.model)
    except Exception as e:  # one line for the harness's verdict; PrepareError says how to fix the data
        print(f"error: evaluation failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"Eval: {score.get('eval_seconds', 0):.1f}s, data checked in {score.get('check_seconds', 0):.1f}s", flush=True)
    if args.result_fd is None:
        print(json.dumps(score))
    else:
        os.write(args.result_fd, json.dumps(score).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
