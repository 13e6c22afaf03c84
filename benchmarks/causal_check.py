"""
What evaluate_bpb's causality check costs: train.py's default model for this machine (untrained: the cost does
not depend on the weights), compiled as train.py compiles it, evaluated with and without the check, alternating.

    AUTORESEARCH_CACHE=DIR uv run python benchmarks/causal_check.py --reps 3
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prepare  # noqa: E402  (before mlx: the CPU BLAS choice)
import mlx.core as mx  # noqa: E402
import train  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="evaluations with and without the check, alternating")
    args = parser.parse_args()
    mx.random.seed(0)
    model = train.GPT(train.config_for_depth(train.DEPTH))
    model.init_weights()
    logits = mx.compile(lambda x: model(x), inputs=model.state)
    tokenizer = prepare.Tokenizer.from_directory()
    check = prepare.check_causal
    prepare.evaluate_bpb(logits, tokenizer, prepare.HARDWARE.eval_batch_size)  # compile first
    seconds = {True: [], False: []}
    for _ in range(args.reps):
        for on in (True, False):
            prepare.check_causal = check if on else (lambda *a: None)
            t0 = time.perf_counter()
            _, tokens = prepare.evaluate_bpb(logits, tokenizer, prepare.HARDWARE.eval_batch_size)
            seconds[on].append(time.perf_counter() - t0)
    on, off = statistics.median(seconds[True]), statistics.median(seconds[False])
    print(f"{prepare.HARDWARE.backend}, depth {train.DEPTH}, {tokens:,} tokens, eval batch "
          f"{prepare.HARDWARE.eval_batch_size}, every call checked; median of {args.reps}:")
    print(f"| evaluation without the check | {off:.2f} s |\n| with the check | {on:.2f} s |\n"
          f"| the check | {on - off:+.2f} s ({(on - off) / off:+.0%}) |")


if __name__ == "__main__":
    main()
