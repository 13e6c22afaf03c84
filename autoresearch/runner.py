"""
Run train.py once, walled in (sandbox.py), and score it: its own process group, a hard wall-clock timeout, the full
output in run.log, a short live progress line on the terminal. The figures the gate judges come from the harness,
not from what train.py prints: its own clock (process start, the training clock's start and the hand-over, read
from scoring.py's pipe as they arrive) and val_bpb from an evaluation process that runs fixed code only, on the
model train.py handed over. Also what the run was: its settings (budget, corpus, evaluation size, device), steps,
tok/s, start-up and a short loss curve.
"""

import hashlib
import json
import math
import os
import platform
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field

from autoresearch import sandbox

LOG_FILE = "run.log"
TRAIN_FILE = "train.py"
KILL_GRACE = 5.0                # seconds between SIGTERM and SIGKILL of the process group
EXIT_GRACE = 30.0               # seconds train.py may take to exit once it has its score
PROGRESS_TTY_EVERY = 0.5        # seconds between live progress updates on a terminal...
PROGRESS_PIPE_EVERY = 30.0      # ...and when captured by an agent's tool (one line each, no \r spam)
PROGRESS_WIDTH = 110
TAIL_LINES = 25                 # log lines shown after a crash
DEFAULT_CACHE = os.path.join("~", ".cache", "autoresearch")  # prepare.py's default cache directory
# the modules train.py runs on that the agent never edits: the metric, the data, the fused ops, the scoring
FIXED_FILES = ("prepare.py", "data_cache.py", "local_corpus.py", "token_shards.py", "fused_ops.py", "scoring.py")
SCORING = "scoring.py"
MAX_UNTIMED_STEPS = 2           # prepare.UNTIMED_STEPS: steps before the clock compile the graphs, they don't train
# The harness's clock (docs/faults.md, "Cheats"). Start-up may take STARTUP_ALLOWANCE seconds (or twice the best
# kept run's), plus KERNEL_CREDIT seconds per kernel compiled in the run. Training may pass the budget by
# GRACE_STEPS steps (the last one, and the loss read one step late), GRACE_SECONDS and the time to write the model.
STARTUP_ALLOWANCE = 15.0
KERNEL_CREDIT = {"cuda": 5.0, "other": 0.5}  # seconds a kernel compiles in: NVRTC on an H100 (~3 s), g++ (~0.3 s)
KERNEL_SUFFIXES = (".so", ".ptx", ".cubin")  # compiled: each is worth its compile time at start-up
KERNEL_FILES = KERNEL_SUFFIXES + (".cpp", ".cu", ".txt")  # what a run may add to the kept kernel cache
MAX_KERNEL_BYTES = 4 << 20      # one such file; a bigger one is not a kernel and is not kept
GRACE_STEPS, GRACE_SECONDS, EXPORT_BYTES_PER_SECOND = 2, 2.0, 1e9
GRACE_CAP_SECONDS, GRACE_CAP_FRACTION = 10.0, 0.05  # the steps' share of the grace: at most max(10 s, 5 % of budget)
MAX_MODEL_BYTES = 4 << 30       # a model handed over may be this big (1 G float32 parameters)
MAX_STEP_EVENTS = 200_000       # a flood beyond it is ignored
MAX_EVENT_BYTES = 1 << 16
LOSS_CURVE_POINTS = 20          # (step, loss) pairs kept with a run
MEMORY_SIGNALS = {6: "SIGABRT", 7: "SIGBUS", 9: "SIGKILL", 11: "SIGSEGV"}  # how running out of memory looks


@dataclass
class RunResult:
    returncode: int = None
    timed_out: bool = False
    signal_name: str = None      # SIGINT/SIGTERM received by the harness during the run
    summary: dict = field(default_factory=dict)  # the harness's figures: val_bpb, seconds, steps, tokens, memory
    child_seconds: float = 0.0
    tail: list = field(default_factory=list)
    facts: dict = field(default_factory=dict)    # settings, steps, tok/s, start-up, loss curve, sandbox
    problem: str = None          # what the harness caught (the clock, the hand-over, the evaluation), or None

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
        if self.problem:
            return self.problem
        if self.val_bpb is not None:  # scored: what train.py does after its hand-over (a crash on a bad score, to
            # be run again for a luckier one) changes nothing
            return None if math.isfinite(self.val_bpb) else f"val_bpb is {self.val_bpb}"
        if self.returncode != 0:
            return f"train.py failed ({describe_exit(self.returncode, self.tail)})"
        return f"val_bpb is {self.summary.get('val_bpb')}"


def describe_exit(code, tail=()):
    """'exit code 1', or 'killed by signal 11 (SIGSEGV): most often out of memory ...'."""
    sig = -code if code < 0 else code - 128 if code > 128 else None  # bwrap exits with 128 + the child's signal
    if sig is None:
        return f"exit code {code}"
    text = f"killed by signal {sig}" + (f" ({MEMORY_SIGNALS[sig]})" if sig in MEMORY_SIGNALS else "")
    if sig in MEMORY_SIGNALS or any("memory" in line.lower() or "bad_alloc" in line for line in tail):
        memory = hardware().get("memory_gb")
        text += (": most often out of memory (an allocation larger than the "
                 + (f"{memory:.0f} GB " if memory else "memory ") + "this machine has); make the model or "
                 "DEVICE_BATCH_SIZE smaller, or undo the last change")
    return text


def cache_path(env=None):
    env = os.environ if env is None else env
    return os.path.abspath(os.path.expanduser(env.get("AUTORESEARCH_CACHE") or DEFAULT_CACHE))


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


def _die_with_parent():
    # Linux: SIGKILL train.py when the process that started it dies (a Ray worker killed mid-run)
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass



def snapshot(root, dest):
    """The committed tree of HEAD in `dest`, with the working train.py (the file about to run, already hashed):
    what the run sees of the project. Untracked files are not there."""
    archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=root, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(dest)
    shutil.copyfile(os.path.join(root, TRAIN_FILE), os.path.join(dest, TRAIN_FILE))
    return dest


class _Channel:
    """scoring.py's events from train.py, each stamped with the harness's clock as it arrives."""

    def __init__(self, fd, start, take_model):
        self.start, self.clock, self.hand_over, self.take_model = start, None, None, take_model
        self.model_bytes, self.model_problem = 0, None  # what take_model found at the hand-over
        self.steps = []  # (seconds since start, step, loss, tokens)
        self.arrived = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(fd,), daemon=True)
        self.thread.start()

    def _read(self, fd):
        with os.fdopen(fd, "rb") as f:
            while line := f.readline(MAX_EVENT_BYTES):
                t = time.monotonic() - self.start
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                kind = e.get("event") if isinstance(e, dict) else None
                if kind == "clock" and self.clock is None:
                    self.clock = t
                elif kind == "step" and len(self.steps) < MAX_STEP_EVENTS:
                    self.steps.append((t, _number(e.get("step")), _number(e.get("loss")), _number(e.get("tokens"))))
                elif kind == "done" and self.hand_over is None:
                    self.hand_over = (t, e)
                    # the copy is taken now: what train.py does to the file afterwards changes nothing
                    self.model_bytes, self.model_problem = self.take_model(e.get("model"))
                    self.arrived.set()


def _number(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def kernel_files(folders):
    """The compiled kernels kept in `folders`: a start-up that compiles them is allowed their time. Only files of a
    compiler's making count (ELF or PTX of 1 KB and more; MLX's CPU kernels only beside their source)."""
    found = set()
    for folder in folders:
        for dirpath, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(dirpath, name)
                if not name.endswith(KERNEL_SUFFIXES) or not _compiled(path):
                    continue
                if name.startswith("lib") and name.endswith(".so") and name[3:-3] + ".cpp" not in names:
                    continue
                found.add(path)
    return found


def _same_file(a, b):
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def _compiled(path):
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    if os.path.getsize(path) < 1024:
        return False
    return head.startswith(b"\x7fELF") or b".version" in head or b"Generated by NVIDIA" in head


class Walls:
    """Where one run lives: a folder of its own holding the project's tree (read-only inside), the scratch folder
    (train.py's only writable place, with its home and /tmp), the evaluation's folder and the model handed over;
    and how the two processes start: train.py, then the evaluation of what it handed over."""

    def __init__(self, root, tree, env):
        self.root, self.cache = root, cache_path(env)
        self.dir = tempfile.mkdtemp(prefix="autoresearch-run-")
        self.tree = tree or snapshot(root, os.path.join(self.dir, "tree"))
        self.scratch = os.path.join(self.dir, "scratch")
        self.eval_dir = os.path.join(self.dir, "eval")  # the fixed files only: nothing else of the tree is importable
        self.model = os.path.join(self.dir, "model.mlxfn")  # the harness's copy, taken at the hand-over
        for folder in (os.path.join(self.scratch, "home"), os.path.join(self.scratch, "tmp", "mlx"),
                       os.path.join(self.eval_dir, "home"), os.path.join(self.eval_dir, "tmp", "mlx")):
            os.makedirs(folder)
        for name in FIXED_FILES:
            if os.path.exists(os.path.join(self.tree, name)):
                shutil.copyfile(os.path.join(self.tree, name), os.path.join(self.eval_dir, name))
        self.enforced, self.how = sandbox.check()
        # compiled kernels persist between runs: one cache for training, another that train.py cannot write (it
        # would otherwise plant a kernel the evaluation loads)
        self.kernels = {False: os.path.join(self.cache, "mlx-kernels"), True: os.path.join(self.cache, "eval-kernels")}
        self.ptx = env.get("MLX_PTX_CACHE_DIR")

    def env(self, base, evaluation=False):
        own = self.eval_dir if evaluation else self.scratch
        env = {**base, "AUTORESEARCH_CACHE": self.cache, "AUTORESEARCH_SCRATCH": self.scratch, "PYTHONUNBUFFERED": "1",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1", "HOME": os.path.join(own, "home"),
               "TMPDIR": os.path.join(own, "tmp")}  # MLX's CPU backend keeps its kernels in TMPDIR/mlx
        if evaluation:
            env["MLX_PTX_CACHE_DIR"] = os.path.join(self.kernels[True], "cuda")
        if not self.enforced:  # no walls: TMPDIR/mlx cannot be a bind of the kernel cache, so point TMPDIR there
            env["TMPDIR"] = os.path.join(self.kernels[evaluation], "tmp")
        return env

    def kernel_folders(self, evaluation=False):
        return [self.kernels[evaluation]] + ([self.ptx] if self.ptx and not evaluation else [])

    def start_kernels(self):
        """The compiled kernels a run starts with. Walled in, a run compiles into its own copy of the training kernel
        cache; settle_kernels() keeps what it added. It never writes the kernels later runs load, nor plants code in
        them."""
        os.makedirs(os.path.join(self.kernels[False], "tmp", "mlx"), exist_ok=True)
        if not self.enforced:
            self.before = kernel_files(self.kernel_folders())
            return
        self.run_kernels = os.path.join(self.dir, "kernels")
        shutil.copytree(self.kernels[False], self.run_kernels, symlinks=True)
        self.before = kernel_files([self.run_kernels])

    def settle_kernels(self):
        """(kernels this run compiled, or what it did wrong). New kernel files go to the kept cache, never over a
        file there; a kept kernel changed in place is a crash."""
        if not self.enforced:
            return len(kernel_files(self.kernel_folders()) - self.before), None
        changed, kept_now = [], set()
        for dirpath, _, names in os.walk(self.run_kernels):
            for name in names:
                path = os.path.join(dirpath, name)
                kept = os.path.join(self.kernels[False], os.path.relpath(path, self.run_kernels))
                if os.path.lexists(kept):
                    if os.path.islink(path) or not os.path.isfile(kept) or not _same_file(path, kept):
                        changed.append(os.path.relpath(path, self.run_kernels))
                elif (name.endswith(KERNEL_FILES) and not os.path.islink(path) and os.path.isfile(path)
                      and os.path.getsize(path) <= MAX_KERNEL_BYTES):
                    os.makedirs(os.path.dirname(kept), exist_ok=True)
                    part = os.path.join(os.path.dirname(kept), ".partial")  # kernel names run to 255 characters
                    shutil.copyfile(path, part)
                    os.replace(part, kept)
                    kept_now.add(path)
        new = len((kernel_files([self.run_kernels]) - self.before) & kept_now)
        if changed:
            return new, (f"train.py changed {len(changed)} compiled kernel(s) that earlier runs kept "
                         f"({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}): the kernel cache is not "
                         "train.py's to write")
        return new, None

    def command(self, argv, evaluation=False):
        kernels = self.kernels[evaluation]
        os.makedirs(os.path.join(kernels, "tmp", "mlx"), exist_ok=True)
        if not self.enforced:
            return argv
        if not evaluation:
            kernels = self.run_kernels
        tokens, data = os.path.join(self.cache, "tokens"), os.path.join(self.cache, "data")
        hidden = () if evaluation else (os.path.join(tokens, "val.bin"), os.path.join(tokens, "val.idx.npy"),
                                        os.path.join(data, "shard_06542.parquet"))
        own = self.eval_dir if evaluation else self.scratch
        writable = [(kernels, self.kernels[evaluation]),  # the run's copy, where MLX looks for the kept cache
                    (os.path.join(kernels, "tmp", "mlx"), os.path.join(own, "tmp", "mlx"))]
        if self.ptx and not evaluation:
            writable.append(self.ptx)
        # the project itself, where it lies inside a folder every run sees (a checkout under /opt): emptied
        masked = [self.root] if any(self.root.startswith(d + os.sep) for d in sandbox.SYSTEM_DIRS) else []
        return sandbox.command(argv, self.eval_dir if evaluation else self.tree, own, self.cache, writable=writable,
                               hidden=hidden, masked=masked,
                               readable=sandbox.python_paths() + ([self.model] if evaluation else []))

    def take_model(self, path):
        """Copy the handed-over model file out of train.py's reach: (its size, None) or (0, what is wrong)."""
        wrong = (0, f"train.py handed over {path!r}, not a model file in its scratch folder (scoring.score_model)")
        if not isinstance(path, str) or os.path.dirname(os.path.abspath(path)) != self.scratch:
            return wrong
        try:
            with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW)) as src:
                size = os.fstat(src.fileno()).st_size
                if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                    return wrong
                if size > MAX_MODEL_BYTES:
                    return 0, f"the model handed over is {size / 2**30:.1f} GB, more than {MAX_MODEL_BYTES / 2**30:.0f} GB"
                with open(self.model, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 24)
            return size, None
        except OSError:
            return wrong

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def judge_clock(channel, budget, new_kernels, model_bytes, startup_reference=None):
    """Why the harness's clock refuses this run, or None. The run's figures come from `channel`."""
    if channel.hand_over is None:
        return None  # judged as a run that handed nothing over
    done = channel.hand_over[0]
    if channel.clock is None:
        return "train.py handed over its model but never started its training clock (scoring.start_clock)"
    untimed = sum(1 for t, *_ in channel.steps if t <= channel.clock)
    if untimed > MAX_UNTIMED_STEPS:
        return (f"train.py trained {untimed} steps before its clock started (at most {MAX_UNTIMED_STEPS}, "
                "prepare.UNTIMED_STEPS, to compile the graphs)")
    timed = [t for t, *_ in channel.steps if t > channel.clock]
    gaps = [b - a for a, b in zip([channel.clock] + timed, timed)]
    step = statistics.median(gaps) if gaps else 0.0
    steps_share = max(GRACE_CAP_SECONDS, GRACE_CAP_FRACTION * budget)  # what steps reported far apart can buy
    # start-up: imports, data, compilation (each new kernel its time) and the untimed steps (each a step's time)
    credit = KERNEL_CREDIT["cuda" if hardware().get("gpu") else "other"]
    base = max(STARTUP_ALLOWANCE, 2 * (startup_reference or 0))
    allowance = base + credit * new_kernels + min(MAX_UNTIMED_STEPS * step, steps_share)
    if channel.clock > allowance:
        return (f"train.py spent {channel.clock:.1f} s before its training clock started, more than the {allowance:.0f} s "
                f"a run may ({base:.0f} s, {new_kernels} kernels "
                f"compiled, {MAX_UNTIMED_STEPS} steps of {step:.1f} s): work before the clock is outside the budget; "
                "do only data, compilation and prepare.UNTIMED_STEPS steps there")
    # the loop stops once its clock passes the budget, with a step in flight: about one step more, two at most.
    # The steps' share is capped: steps reported far apart must not stretch the budget
    limit = budget + min(GRACE_STEPS * step, steps_share) + GRACE_SECONDS + model_bytes / EXPORT_BYTES_PER_SECOND
    if done - channel.clock > limit:
        return (f"train.py trained {done - channel.clock:.1f} s by the harness's clock, past the {budget:g} s budget "
                f"(allowed up to {limit:.1f} s: {GRACE_STEPS} steps of {step:.2f} s and the model's hand-over)")
    return None


def figures(channel, evaluation, exit_seconds, peak_mb):
    """The run's summary as the harness measured it."""
    val_bpb = evaluation.get("val_bpb")  # nan stays nan: the gate says so
    summary = {"val_bpb": float(val_bpb) if isinstance(val_bpb, (int, float)) else None, "eval_tokens": _number(evaluation.get("eval_tokens")),
               "eval_seconds": _number(evaluation.get("seconds")), "total_seconds": round(exit_seconds, 1),
               "peak_vram_mb": _number(peak_mb)}
    if channel.clock is not None:
        summary["startup_seconds"] = round(channel.clock, 1)
        timed = [s for s in channel.steps if s[0] > channel.clock]
        summary["num_steps"] = len(timed)
        tokens = [s[3] for s in channel.steps if s[3] is not None]
        if channel.hand_over:
            summary["training_seconds"] = round(channel.hand_over[0] - channel.clock, 1)
        if tokens:
            summary["total_tokens_M"] = round(tokens[-1] / 1e6, 3)
    return {k: v for k, v in summary.items() if v is not None}


def loss_curve(steps, points=LOSS_CURVE_POINTS):
    """A few (step, loss) pairs spread over the run."""
    losses = [(s, loss) for _, s, loss, _ in steps if s is not None and loss is not None]
    if len(losses) <= points:
        return [[s, round(loss, 4)] for s, loss in losses]
    picks = sorted({round(i * (len(losses) - 1) / (points - 1)) for i in range(points)})
    return [[losses[i][0], round(losses[i][1], 4)] for i in picks]


def run_train(root, seed, budget, timeout, stop, label="train.py", stream=None, on_start=None,
              die_with_parent=False, tree=None, startup_reference=None):
    """Run train.py (from `tree`, or a snapshot of `root`'s HEAD and working train.py) to completion, timeout or stop
    request, and score what it hands over. `stop` is a callable returning a signal name once the harness has been
    asked to stop (Ctrl-C / SIGTERM). The log goes to `root`/run.log."""
    stream = stream or sys.stderr
    base_env = {**os.environ, "AUTORESEARCH_SEED": str(seed), "AUTORESEARCH_TIME_BUDGET": f"{budget:g}"}
    walls = Walls(root, tree, base_env)
    result = RunResult()
    corpus, fixed = corpus_identity(base_env), fixed_identity(walls.tree)  # what this run trains on and imports
    walls.start_kernels()
    report_r, report_w = os.pipe()
    reply_r, reply_w = os.pipe()
    env = {**walls.env(base_env), "AUTORESEARCH_REPORT_FD": str(report_w), "AUTORESEARCH_REPLY_FD": str(reply_r)}
    log = Log(os.path.join(root, LOG_FILE), stream, f"[{label} seed {seed}]")
    start = time.monotonic()
    try:
        # own session = own process group: the timeout kills train.py and everything it started, and a Ctrl-C on
        # the terminal reaches only the harness, which then stops the group in order
        proc = subprocess.Popen(walls.command([sys.executable, TRAIN_FILE]), cwd=walls.tree, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, pass_fds=(report_w, reply_r),
                                preexec_fn=_die_with_parent if die_with_parent else None)
        os.close(report_w)
        os.close(reply_r)
        if on_start:
            on_start(proc.pid)
        channel = _Channel(report_r, start, walls.take_model)
        log.pump(proc.stdout)
        evaluation = _wait(proc, channel, walls, base_env, reply_w, log, stop, start, timeout, result)
    finally:
        os.close(reply_w)
        log.close()
    exit_seconds = result.child_seconds
    hand_over = (channel.hand_over or (None, {}))[1]
    model_bytes = channel.model_bytes
    new_kernels, kernel_problem = walls.settle_kernels()
    walls.close()
    result.returncode = proc.returncode
    result.tail = log.tail()
    result.summary = figures(channel, evaluation, exit_seconds, hand_over.get("peak_memory_mb"))
    result.problem = (judge_clock(channel, budget, new_kernels, model_bytes, startup_reference)
                      or evaluation.get("problem") or kernel_problem or result.problem)
    if channel.hand_over is None and not result.problem and proc.returncode == 0:
        result.problem = "train.py exited without handing over its model (scoring.score_model)"
    s = result.summary
    tokens = [step[3] for step in channel.steps if step[3] is not None]
    trained = channel.hand_over[0] - channel.clock if channel.hand_over and channel.clock is not None else 0
    tok_per_sec = tokens[-1] / trained if tokens and trained > 0 else None
    result.facts = {"steps": s.get("num_steps"), "tok_per_sec": round(tok_per_sec, 1) if tok_per_sec else None,
                    "startup_seconds": s.get("startup_seconds"),
                    "eval_tokens": int(s["eval_tokens"]) if s.get("eval_tokens") else None, "budget": float(budget),
                    "untimed_steps": sum(1 for t, *_ in channel.steps if channel.clock is None or t <= channel.clock),
                    "loss_curve": loss_curve(channel.steps), "new_kernels": new_kernels,
                    "sandbox": walls.how if walls.enforced else f"none: {walls.how}",
                    "corpus": corpus, "device": device_key(hardware()), "eval_request": eval_request(base_env),
                    "fixed_files": fixed}
    with open(os.path.join(root, LOG_FILE), "a") as f:  # for people: what the verdict uses, beside what train.py said
        f.write("--- the harness's figures (the verdict uses these, not what train.py printed)\n"
                + "".join(f"{k}: {v}\n" for k, v in sorted(result.summary.items()))
                + (f"not a valid result: {result.failure()}\n" if result.failure() else ""))
    return result


def _wait(proc, channel, walls, base_env, reply_w, log, stop, start, timeout, result):
    """Wait for train.py; score its model when it hands it over. Returns the evaluation ({} if none ran)."""
    evaluation, exit_by = {}, None
    try:
        while True:
            try:
                proc.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                pass
            elapsed = time.monotonic() - start
            result.signal_name = stop()
            if result.signal_name or elapsed > timeout or (exit_by and elapsed > exit_by):
                if not (exit_by and elapsed > exit_by):  # lingering after its score: stopped, the score stands
                    result.timed_out = not result.signal_name
                _kill_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=KILL_GRACE)
                except subprocess.TimeoutExpired:
                    pass
                break
            if channel.arrived.is_set() and not evaluation:
                evaluation = _evaluate(channel, walls, base_env, log, stop, start + timeout)
                reply = {"error": evaluation["problem"]} if "problem" in evaluation else \
                    {"val_bpb": evaluation["val_bpb"], "eval_tokens": evaluation["eval_tokens"]}
                try:
                    os.write(reply_w, (json.dumps(reply) + "\n").encode())
                except OSError:
                    pass
                exit_by = time.monotonic() - start + EXIT_GRACE  # it has its score: nothing left to wait for
            log.progress(elapsed)
    finally:
        # whatever happened, nothing train.py started may outlive the run
        _kill_group(proc.pid, signal.SIGKILL)
        proc.wait()
        result.child_seconds = time.monotonic() - start
        channel.thread.join(timeout=5)
    return evaluation


def _evaluate(channel, walls, base_env, log, stop, deadline):
    """Score the handed-over model with `scoring.py evaluate`, fixed code in a process of its own."""
    if channel.model_problem:
        return {"problem": channel.model_problem}
    log.write(f"--- the harness scores the handed-over model ({channel.model_bytes / 1e6:.1f} MB)\n")
    read, write = os.pipe()
    t0 = time.monotonic()
    # -s: no user site-packages; the evaluation's folder holds the fixed files only
    argv = [sys.executable, "-s", SCORING, "evaluate", walls.model, "--result-fd", str(write)]
    proc = subprocess.Popen(walls.command(argv, evaluation=True), cwd=walls.eval_dir, env=walls.env(base_env, True),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, pass_fds=(write,))
    os.close(write)
    output = []
    reader = threading.Thread(target=lambda: output.append(proc.stdout.read()), daemon=True)
    reader.start()
    with os.fdopen(read, "rb") as f:
        while proc.poll() is None and not stop() and time.monotonic() < deadline:
            time.sleep(0.1)
        _kill_group(proc.pid, signal.SIGKILL)
        proc.wait()
        score = f.read()
    reader.join(timeout=5)
    text = b"".join(output).decode(errors="replace")
    log.write(text)
    try:
        evaluation = json.loads(score)
    except ValueError:
        last = [line for line in text.splitlines() if line.strip()][-1:] or [f"exit code {proc.returncode}"]
        return {"problem": f"the evaluation of the handed-over model failed: {last[0].strip()[:300]}"}
    evaluation["seconds"] = round(time.monotonic() - t0, 2)
    return evaluation


class Log:
    """run.log and the live progress line: everything train.py prints, then the evaluation's output."""

    def __init__(self, path, stream, label):
        self.file = open(path, "wb")
        self.lock = threading.Lock()
        self.chunks, self.last_line = [], ""
        self.progress_line = _Progress(stream, label)
        self.start = time.monotonic()
        self.reader = None

    def pump(self, pipe):
        def read():  # raw bytes: progress lines ending in \r still show up live
            while data := (pipe.read1(65536) if hasattr(pipe, "read1") else pipe.read(4096)):
                self.write(data)
        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()

    def write(self, data):
        data = data.encode() if isinstance(data, str) else data
        with self.lock:
            self.file.write(data)
            self.file.flush()
            self.chunks.append(data)
            pieces = [p for p in data.decode(errors="replace").replace("\r", "\n").split("\n") if p.strip()]
            if pieces:
                self.last_line = pieces[-1]

    def progress(self, elapsed):
        self.progress_line.update(elapsed, self.last_line)

    def tail(self):
        text = b"".join(self.chunks).decode(errors="replace")
        return [line for line in text.replace("\r", "\n").split("\n") if line.strip()][-TAIL_LINES:]

    def close(self):
        if self.reader:
            self.reader.join(timeout=5)
        self.file.close()
        self.progress_line.close()



# ---------------------------------------------------------------------------
# what ran it (recorded with every run, so results from different machines are never mixed up unknowingly)

_HARDWARE = None


def hardware():
    global _HARDWARE
    if _HARDWARE is None:
        info = {"host": platform.node(), "system": platform.system(), "machine": platform.machine(),
                "cpu_count": os.cpu_count(), "python": platform.python_version()}
        try:
            info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
        except (ValueError, OSError, AttributeError):
            pass
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
