"""
What every part of the harness shares: the refusal, exit codes, run options and their defaults, printing and
time stamps, signal handling. Imports nothing else of the harness, so every module can import it.

Layers, bottom-up: common -> gitops / ledger / gate / runner / lock -> experiment -> candidates / serve /
parallel -> cli. `status` and `plot` read the ledger and sit beside experiment, never above parallel mode.
"""

import math
import os
import signal
import sys
import time
from dataclasses import dataclass

EXIT_OK, EXIT_CRASH, EXIT_REFUSED = 0, 1, 2
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}

DEFAULT_SEED = 42
DEFAULT_BUDGET = 300            # training seconds, same default as train.py
NOISE_RUNS = 3                  # extra seeds `autoresearch noise` runs
CONFIRM_SEEDS = 2               # extra seeds for a borderline candidate (0: never confirm)


class Refusal(Exception):
    """A reason not to start; printed as is, nothing has been changed."""


def number(what, text, integer=False, low=0.0, low_ok=False):
    """A setting from the command line or the environment, checked before anything happens: a finite number above
    `low` (or equal, with low_ok), whole if `integer`. Anything else is a Refusal saying what was wrong."""
    kind = "a whole number" if integer else "a number"
    bound = f"{'>=' if low_ok else '>'} {low:g}"
    try:
        value = int(text) if integer else float(text)
    except (TypeError, ValueError):
        raise Refusal(f"{what} must be {kind} {bound}, got {text!r}") from None
    if not math.isfinite(value) or value < low or (value == low and not low_ok):
        raise Refusal(f"{what} must be {kind} {bound}, got {text!r}")
    return value


def env_number(name, default, **kw):
    """number() for an environment variable; unset or empty gives the default."""
    text = os.environ.get(name)
    return number(f"{name} (environment)", text, **kw) if text not in (None, "") else default


def default_timeout(budget):
    """Budget plus a generous allowance for start-up, compilation and the final evaluation: 300 s -> 600 s.
    At least 300 s: on a CUDA machine whose kernel cache is cold, MLX compiled for ~175 s before step 1."""
    return budget + max(300.0, budget)


@dataclass
class Options:
    description: str = ""
    seed: int = DEFAULT_SEED
    budget: float = DEFAULT_BUDGET
    timeout: float = None        # None: default_timeout(budget)
    confirm: int = CONFIRM_SEEDS
    rerun: bool = False
    simpler: bool = False
    margin: float = None         # None: from the noise estimate
    runs: int = NOISE_RUNS       # noise only

    def hard_timeout(self):
        return self.timeout if self.timeout is not None else default_timeout(self.budget)


def quiet_stdout():
    """The reader of our stdout is gone (`autoresearch status | head -1`): send the rest, and the flush at exit,
    to /dev/null instead of failing on every write."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def say(*lines):
    for line in lines:
        try:
            print(line, flush=True)
        except BrokenPipeError:
            quiet_stdout()  # a run's bookkeeping (commit, ledger, revert) must not stop halfway for a closed pipe


def now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def short(commit):
    return commit[:7] if commit else "-"


def install_hint():
    return "parallel mode needs Ray: `uv sync --extra parallel` (or `pip install ray`)"


class StopSignals:
    """Ctrl-C and SIGTERM become a flag: the run loop stops train.py in order, and the bookkeeping after it
    can't be cut in half by a second Ctrl-C."""

    def __init__(self):
        self.name = None

    def __enter__(self):
        self.saved = {s: signal.signal(s, self.handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handler(self, signum, frame):
        self.name = self.name or signal.Signals(signum).name

    def __call__(self):
        return self.name

    def __exit__(self, *exc):
        for s, h in self.saved.items():
            signal.signal(s, h)
