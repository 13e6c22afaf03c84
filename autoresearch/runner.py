"""
Run train.py once: its own process group, a hard wall-clock timeout, the full output in run.log, a short live
progress line on the terminal, and the `---` summary block parsed at the end. Also what the run was: its
settings (budget, corpus, evaluation size, device), steps, tok/s and start-up time, read from its output.
"""

import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

LOG_FILE = "run.log"
KILL_GRACE = 5.0                # seconds between SIGTERM and SIGKILL of the process group
PROGRESS_TTY_EVERY = 0.5        # seconds between live progress updates on a terminal...
PROGRESS_PIPE_EVERY = 30.0      # ...and when captured by an agent's tool (one line each, no \r spam)
PROGRESS_WIDTH = 110
TAIL_LINES = 25                 # log lines shown after a crash
DEFAULT_CACHE = os.path.join("~", ".cache", "autoresearch")  # prepare.py's default cache directory
# the modules train.py runs on that the agent never edits: the metric, the data, the fused ops
FIXED_FILES = ("prepare.py", "data_cache.py", "local_corpus.py", "token_shards.py", "fused_ops.py")
DECIMAL = r"\d+(?:\.\d+)?"       # numbers read from train.py's own lines (it may print anything: never crash on it)
MAX_UNTIMED_STEPS = 2           # program.md: steps before the clock starts compile the graphs, they don't train


@dataclass
class RunResult:
    returncode: int = None
    timed_out: bool = False
    signal_name: str = None      # SIGINT/SIGTERM received by the harness during the run
    summary: dict = field(default_factory=dict)
    child_seconds: float = 0.0
    tail: list = field(default_factory=list)
    facts: dict = field(default_factory=dict)    # run_facts(): steps, tok/s, start-up, eval tokens, device, corpus

    @property
    def val_bpb(self):
        v = self.summary.get("val_bpb")
        return v if isinstance(v, float) else None

    def failure(self):
        """Why this run is not a valid result, or None."""
        if self.signal_name:
            return f"interrupted by {self.signal_name}"
        if self.timed_out:
            return f"timed out after {self.child_seconds:.0f} s (process group killed)"
        if self.returncode != 0:
            how = f"killed by signal {-self.returncode}" if self.returncode < 0 else f"exit code {self.returncode}"
            return f"train.py failed ({how})"
        if "val_bpb" not in self.summary:
            return "train.py exited 0 but printed no val_bpb summary"
        if self.val_bpb is None or not math.isfinite(self.val_bpb):
            return f"val_bpb is {self.summary['val_bpb']}"
        if (self.facts.get("untimed_steps") or 0) > MAX_UNTIMED_STEPS:
            return (f"train.py trained {self.facts['untimed_steps']} steps before its clock started (UNTIMED_STEPS: at "
                    f"most {MAX_UNTIMED_STEPS}, to compile the graphs); set it back to {MAX_UNTIMED_STEPS}")
        return None


def parse_summary(text):
    """The `key: value` lines after the last line that is exactly `---`."""
    lines = text.replace("\r", "\n").split("\n")
    starts = [i for i, line in enumerate(lines) if line.strip() == "---"]
    if not starts:
        return {}
    summary = {}
    for line in lines[starts[-1] + 1:]:
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not key or " " in key:
            continue
        try:
            summary[key] = float(value)  # float() also reads nan/inf, which the gate must see
        except ValueError:
            summary[key] = value
    return summary


def run_facts(text, summary):
    """What a run reports about itself besides val_bpb. Summary keys win (tok_per_sec, startup_seconds, eval_tokens
    if train.py prints them); otherwise the lines train.py prints before the summary. Missing ones are None."""
    def line(pattern):
        found = re.findall(pattern, text, re.M)
        return found[-1] if found else None

    def number(key):
        v = summary.get(key)
        return v if isinstance(v, float) and math.isfinite(v) else None

    steps, seconds = number("num_steps"), number("training_seconds")
    tok_per_sec = number("tok_per_sec")
    batch, untimed = line(r"^Batch: (\d+) tokens per step"), line(r"(\d+) untimed steps")
    if tok_per_sec is None and steps is not None and seconds:
        if batch:
            tok_per_sec = (steps - int(untimed or 0)) * int(batch) / seconds
        elif number("total_tokens_M") is not None:
            tok_per_sec = number("total_tokens_M") * 1e6 / seconds
    startup = number("startup_seconds")
    if startup is None and line(rf"^Startup: ({DECIMAL})s"):
        startup = float(line(rf"^Startup: ({DECIMAL})s"))
    if startup is None and number("total_seconds") is not None and seconds is not None:
        startup = number("total_seconds") - seconds - float(line(rf"^Eval: ({DECIMAL})s") or 0)
    eval_tokens = number("eval_tokens") or line(r"^Hardware: .*\beval (\d+) tokens")
    budget = line(rf"^Time budget: ({DECIMAL})s")
    return {"steps": int(steps) if steps is not None else None,
            "tok_per_sec": round(tok_per_sec, 1) if tok_per_sec is not None else None,
            "startup_seconds": round(startup, 1) if startup is not None else None,
            "eval_tokens": int(eval_tokens) if eval_tokens is not None else None,
            "budget": float(budget) if budget else None,
            "untimed_steps": int(untimed) if untimed is not None else None}


def eval_request(env=None):
    """The evaluation size asked of train.py: AUTORESEARCH_EVAL_TOKENS, or "default" (prepare.py's profile)."""
    env = os.environ if env is None else env
    return env.get("AUTORESEARCH_EVAL_TOKENS") or "default"


def fixed_identity(root):
    """A short hash of the fixed modules as they are in `root`: runs made on other fixed files (another metric,
    another loader) are not comparable, even when the change was committed."""
    h = hashlib.sha256()
    for name in FIXED_FILES:
        try:
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read() + b"\0")
        except OSError:
            h.update(name.encode() + b"\0(missing)\0")
    return h.hexdigest()[:12]


def corpus_identity(env=None):
    """Which corpus the cache train.py will read holds: prepare.py's data/source.json ({"source": "local",
    "sha256": ...} or {"source": "climbmix", "url": ...}), or None if there is none."""
    env = os.environ if env is None else env
    cache = os.path.expanduser(env.get("AUTORESEARCH_CACHE") or DEFAULT_CACHE)
    try:
        with open(os.path.join(cache, "data", "source.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class _Progress:
    """One short line: elapsed time and the last thing train.py printed."""

    def __init__(self, stream, label):
        self.stream, self.label = stream, label
        self.tty = stream.isatty()
        self.every = PROGRESS_TTY_EVERY if self.tty else PROGRESS_PIPE_EVERY
        self.last_shown = time.monotonic()
        self.shown_any = False

    def update(self, elapsed, last_line, force=False):
        now = time.monotonic()
        if not force and now - self.last_shown < self.every:
            return
        self.last_shown = now
        text = f"{self.label} {elapsed:5.0f}s | {' '.join(last_line.split())}"[:PROGRESS_WIDTH]
        if self.tty:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.shown_any = True

    def close(self):
        if self.tty and self.shown_any:
            self.stream.write("\n")
            self.stream.flush()


def _kill_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _die_with_parent():
    # Linux: SIGKILL train.py when the process that started it dies (a Ray worker killed mid-run)
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_train(root, seed, budget, timeout, stop, label="train.py", stream=None, pass_fds=(), on_start=None,
              die_with_parent=False):
    """Run train.py to completion, timeout or stop request. `stop` is a callable returning a signal name once
    the harness has been asked to stop (Ctrl-C / SIGTERM)."""
    stream = stream or sys.stderr
    env = {**os.environ, "AUTORESEARCH_SEED": str(seed), "AUTORESEARCH_TIME_BUDGET": f"{budget:g}",
           "PYTHONUNBUFFERED": "1"}  # live output through the pipe
    log_path = os.path.join(root, LOG_FILE)
    result = RunResult()
    chunks, last_line = [], [""]
    corpus = corpus_identity(env)  # read before the run: the cache this run trains on
    fixed = fixed_identity(root)  # and the fixed modules it imports
    log = open(log_path, "wb")
    start = time.monotonic()
    # own session = own process group: the timeout kills train.py and everything it started, and a Ctrl-C on
    # the terminal reaches only the harness, which then stops the group in order
    proc = subprocess.Popen([sys.executable, "train.py"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                            pass_fds=pass_fds, preexec_fn=_die_with_parent if die_with_parent else None)
    if on_start:
        on_start(proc.pid)

    def pump():  # reads raw bytes: progress lines ending in \r still show up live
        while True:
            data = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
            if not data:
                break
            log.write(data)
            log.flush()
            chunks.append(data)
            pieces = [p for p in data.decode(errors="replace").replace("\r", "\n").split("\n") if p.strip()]
            if pieces:
                last_line[0] = pieces[-1]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    progress = _Progress(stream, f"[{label} seed {seed}]")
    try:
        while True:
            try:
                proc.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                pass
            elapsed = time.monotonic() - start
            result.signal_name = stop()
            if result.signal_name or elapsed > timeout:
                result.timed_out = not result.signal_name
                _kill_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=KILL_GRACE)
                except subprocess.TimeoutExpired:
                    pass
                break
            progress.update(elapsed, last_line[0])
    finally:
        # whatever happened, nothing train.py started may outlive the run
        _kill_group(proc.pid, signal.SIGKILL)
        proc.wait()
        result.child_seconds = time.monotonic() - start
        reader.join(timeout=5)
        log.close()
        progress.close()
    result.returncode = proc.returncode
    text = b"".join(chunks).decode(errors="replace")
    result.summary = parse_summary(text)
    result.facts = {**run_facts(text, result.summary), "corpus": corpus, "device": device_key(hardware()),
                    "eval_request": eval_request(env), "fixed_files": fixed}
    result.tail = [line for line in text.replace("\r", "\n").split("\n") if line.strip()][-TAIL_LINES:]
    return result


# ---------------------------------------------------------------------------
# what ran it (recorded with every run, so results from different machines are never mixed up unknowingly)

_HARDWARE = None


def hardware():
    global _HARDWARE
    if _HARDWARE is None:
        info = {"host": platform.node(), "system": platform.system(), "machine": platform.machine(),
                "cpu_count": os.cpu_count(), "python": platform.python_version()}
        try:
            with open("/proc/cpuinfo") as f:
                info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        except OSError:
            pass
        try:
            from importlib.metadata import version
            info["mlx"] = version("mlx")
        except Exception:
            pass
        if shutil.which("nvidia-smi"):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=10).stdout.strip()
                info["gpu"] = ", ".join(sorted(set(out.splitlines()))) or None  # the model, not how many
            except (OSError, subprocess.SubprocessError):
                pass
        elif platform.system() == "Darwin":
            try:
                info["chip"] = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                              text=True, timeout=5).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                pass
        _HARDWARE = info
    return _HARDWARE


def device_key(hw):
    """The kind of device a run trained on, for comparing runs: the GPU model, the Mac's chip, else the CPU."""
    return hw.get("gpu") or hw.get("chip") or f"{hw.get('cpu') or hw.get('machine')}, {hw.get('cpu_count')} cores"
