"""
Tests of the experiment harness (`autoresearch ...`) against a fixture train.py in throwaway git repositories.
Offline and fast: the fixture "trains" in milliseconds.
"""

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from autoresearch import gate, runner
from conftest import ROOT

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "train.py")
FIXTURE_SCORING = os.path.join(ROOT, "tests", "fixtures", "scoring.py")
BRANCH = "autoresearch/test"


# ---------------------------------------------------------------------------
# helpers

def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def harness_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env["PYTHONPATH"] = ROOT
    return {**env, **extra}


def ar(repo, *args, timeout=60, env=None):
    return subprocess.run([sys.executable, "-m", "autoresearch", *args], cwd=repo, capture_output=True, text=True,
                          env=harness_env(**(env or {})), timeout=timeout)


def ar_start(repo, *args, env=None):
    return subprocess.Popen([sys.executable, "-m", "autoresearch", *args], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=harness_env(**(env or {})))


def add_fixture_files(path):
    """The stand-in train.py, and scoring.py: the real protocol with a stand-in evaluation appended."""
    shutil.copy(FIXTURE, os.path.join(path, "train.py"))
    real = open(os.path.join(ROOT, "scoring.py")).read()
    with open(os.path.join(path, "scoring.py"), "w") as f:
        f.write(real[:real.rindex('if __name__ == "__main__":')] + open(FIXTURE_SCORING).read())


@pytest.fixture
def repo(tmp_path):
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.email", "test@example.com")
    git(path, "config", "user.name", "test")
    add_fixture_files(path)
    (path / ".gitignore").write_text("results.tsv\nrun.log\nprogress.png\n.autoresearch/\n")
    (path / "notes.md").write_text("my notes\n")
    git(path, "add", ".")
    git(path, "commit", "-q", "-m", "initial")
    git(path, "checkout", "-q", "-b", BRANCH)
    return str(path)


def edit(repo, append="", **consts):
    """Change the fixture's constants (MODE="crash", BPB=0.9, ...) and/or append text, like an agent's edit."""
    path = os.path.join(repo, "train.py")
    text = open(path).read()
    for name, value in consts.items():
        text, n = re.subn(rf"^{name} = .*?(\s+#.*)?$", lambda m: f"{name} = {value!r}{m.group(1) or ''}", text,
                          count=1, flags=re.M)
        assert n == 1, name
    open(path, "w").write(text + append)
    return text + append


def read(repo, name="train.py"):
    return open(os.path.join(repo, name)).read()


def ledger(repo):
    with open(os.path.join(repo, ".autoresearch", "ledger.jsonl")) as f:
        return [json.loads(line) for line in f]


def results(repo):
    with open(os.path.join(repo, "results.tsv")) as f:
        return [line.rstrip("\n").split("\t") for line in f]


def orphans(seed=42):
    """Live processes the fixture's hang mode started (in a session of their own, as `setsid` would)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f"fixture-orphan-{seed}".encode() not in f.read():
                    continue
            with open(f"/proc/{pid}/status") as f:  # a zombie waiting for a reaper is dead
                if not re.search(r"^State:\s+Z", f.read(), re.M):
                    found.append(int(pid))
        except OSError:
            pass
    return found


def no_orphans(seed=42, wait=5.0):
    deadline = time.monotonic() + wait
    while orphans(seed) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not orphans(seed)


def fixture_value(text, seed):
    spec = importlib.util.spec_from_file_location("fixture_train", FIXTURE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    consts = dict(re.findall(r"^(BPB|NOISE) = ([0-9.]+)", text, re.M))
    return mod.val_bpb(text, seed, float(consts["BPB"]), float(consts["NOISE"]))


def baseline(repo, *args):
    r = ar(repo, "run", "-m", "baseline", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    return git(repo, "rev-parse", "HEAD")


# ---------------------------------------------------------------------------
# refusals: nothing may change

def test_refuses_outside_git_repo(tmp_path):
    shutil.copy(FIXTURE, tmp_path / "train.py")
    r = ar(str(tmp_path), "run", "-m", "x")
    assert r.returncode == 2 and "not inside a git repository" in r.stderr


def test_refuses_on_wrong_branch(repo):
    git(repo, "checkout", "-q", "main")
    r = ar(repo, "run", "-m", "x")
    assert r.returncode == 2 and "autoresearch/<tag>" in r.stderr
    assert not os.path.exists(os.path.join(repo, "results.tsv"))


def test_refuses_other_uncommitted_changes_and_keeps_them(repo):
    open(os.path.join(repo, "notes.md"), "a").write("unsaved thought\n")
    edit(repo, BPB=0.9)
    head = git(repo, "rev-parse", "HEAD")
    r = ar(repo, "run", "-m", "x")
    assert r.returncode == 2 and "notes.md" in r.stderr
    assert read(repo, "notes.md").endswith("unsaved thought\n") and "BPB = 0.9" in read(repo)
    assert git(repo, "rev-parse", "HEAD") == head
    git(repo, "add", "notes.md")  # staged counts too
    assert ar(repo, "run", "-m", "x").returncode == 2


def test_untracked_files_are_allowed_and_untouched(repo):
    open(os.path.join(repo, "scratch.txt"), "w").write("keep me")
    baseline(repo)
    edit(repo, BPB=1.5)
    assert ar(repo, "run", "-m", "worse").returncode == 0
    assert read(repo, "scratch.txt") == "keep me"


# ---------------------------------------------------------------------------
# keep / discard / crash

def test_keep_discard_and_revert(repo):
    base = baseline(repo)
    edit(repo, BPB=0.9)
    r = ar(repo, "run", "-m", "better")
    assert r.returncode == 0 and "verdict:      keep" in r.stdout
    kept = git(repo, "rev-parse", "HEAD")
    assert kept != base and git(repo, "log", "-1", "--format=%s") == "better"
    kept_text = read(repo)

    edit(repo, BPB=0.95)
    r = ar(repo, "run", "-m", "worse")
    assert r.returncode == 0 and "verdict:      discard" in r.stdout
    assert git(repo, "rev-parse", "HEAD") == kept          # branch moved back, history clean
    assert read(repo) == kept_text                          # train.py reverted
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""

    rows = results(repo)
    assert rows[0] == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert [row[3] for row in rows[1:]] == ["keep", "keep", "discard"]
    assert rows[2][:2] == [kept[:7], "0.900000"] and rows[2][2] == "2.0"
    recs = ledger(repo)
    assert [r["verdict"] for r in recs] == ["keep", "keep", "discard"]
    last = recs[-1]
    for key in ("commit", "content_hash", "seed", "metrics", "hardware", "start_time", "wall_seconds", "verdict",
                "reason", "harness_seconds", "overhead_seconds"):
        assert key in last, key
    assert last["metrics"]["num_steps"] == 3.0 and last["seed"] == 42
    assert os.path.exists(os.path.join(repo, "run.log"))


@pytest.mark.parametrize("mode,reason", [("crash", "exit code 1"), ("nan", "exit code 1"),
                                         ("segv", "killed by signal 11 (SIGSEGV): most often out of memory"),
                                         ("nosummary", "without handing over its model")])
def test_crash_reverts(repo, mode, reason):
    base = baseline(repo)
    base_text = read(repo)
    edit(repo, MODE=mode)
    r = ar(repo, "run", "-m", f"try {mode}")
    assert r.returncode == 1 and "verdict:      crash" in r.stdout and reason in r.stdout
    assert "last lines of run.log" in r.stdout
    assert git(repo, "rev-parse", "HEAD") == base and read(repo) == base_text
    assert results(repo)[-1][1:4] == ["0.000000", "0.0", "crash"]


def test_nan_val_bpb_is_a_crash_even_with_exit_0(repo):
    baseline(repo)
    edit(repo, MODE="nan_exit0")
    r = ar(repo, "run", "-m", "nan bpb")
    assert r.returncode == 1 and "val_bpb is nan" in r.stdout


def test_timeout_kills_the_whole_process_group(repo):
    base = baseline(repo, "--budget", "1")
    edit(repo, MODE="hang")
    t0 = time.monotonic()
    r = ar(repo, "run", "-m", "hangs", "--budget", "1", "--timeout", "2")
    assert time.monotonic() - t0 < 15
    assert r.returncode == 1 and "timed out" in r.stdout
    assert no_orphans(), "a child train.py started in a session of its own outlived the timeout"
    assert git(repo, "rev-parse", "HEAD") == base


def test_a_train_py_that_imports_an_untracked_file_is_refused(repo):
    base = baseline(repo)
    with open(os.path.join(repo, "helper_lr.py"), "w") as f:
        f.write("LR = 0.1\n")
    text = edit(repo, append="\nfrom helper_lr import LR  # noqa\n")
    r = ar(repo, "run", "-m", "lr from a helper module")
    assert r.returncode == 2 and "helper_lr.py" in r.stderr and "does not track" in r.stderr, r.stderr
    assert git(repo, "rev-parse", "HEAD") == base and read(repo) == text
    git(repo, "add", "helper_lr.py")  # tracked (and committed with it, by the user): fine
    git(repo, "commit", "-q", "-m", "helper", "--", "helper_lr.py")
    assert ar(repo, "run", "-m", "lr from a committed helper").returncode == 0


def test_identical_train_py_is_not_rerun_unless_asked(repo):
    baseline(repo)
    r = ar(repo, "run", "-m", "same again")
    assert r.returncode == 2 and "already run" in r.stderr
    edit(repo, BPB=1.2)
    ar(repo, "run", "-m", "worse")
    edit(repo, BPB=1.2)  # the discarded idea again, by accident
    assert ar(repo, "run", "-m", "worse again").returncode == 2
    assert len(ledger(repo)) == 2
    r = ar(repo, "run", "-m", "worse, on purpose", "--rerun")
    assert r.returncode == 0 and len(ledger(repo)) == 3


def test_committed_work_on_other_files_survives_a_discard(repo):
    baseline(repo)
    open(os.path.join(repo, "notes.md"), "a").write("committed idea list\n")
    git(repo, "commit", "-qam", "notes")
    notes_commit = git(repo, "rev-parse", "HEAD")
    base_text = read(repo)
    edit(repo, BPB=1.3)
    assert ar(repo, "run", "-m", "worse").returncode == 0
    assert read(repo) == base_text and "committed idea list" in read(repo, "notes.md")
    assert git(repo, "merge-base", "--is-ancestor", notes_commit, "HEAD") == ""  # still on the branch
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""


def test_baseline_crash_leaves_train_py_for_fixing(repo):
    edit(repo, MODE="crash")
    r = ar(repo, "run", "-m", "broken baseline")
    assert r.returncode == 1 and "baseline crashed" in r.stdout
    assert "MODE = 'crash'" in read(repo)
    edit(repo, MODE="good")
    r = ar(repo, "run", "-m", "fixed baseline")
    assert r.returncode == 0 and "baseline" in r.stdout


def test_a_crash_is_not_already_run_and_spends_no_seed(repo):
    # a crash can be a fluke (here: a timeout): the same train.py runs again without --rerun, with the same seed
    edit(repo, SLEEP=1.5)
    r = ar(repo, "run", "-m", "baseline", "--budget", "0.5", "--timeout", "1")
    assert r.returncode == 1 and "timed out" in r.stdout, r.stdout + r.stderr
    r = ar(repo, "run", "-m", "baseline again", "--budget", "0.5")
    assert r.returncode == 0 and "verdict:      keep" in r.stdout, r.stdout + r.stderr
    edit(repo, BPB=0.9)
    assert ar(repo, "run", "-m", "better, timed out", "--budget", "0.5", "--timeout", "1").returncode == 1
    edit(repo, BPB=0.9)  # the same idea again: train.py went back to the baseline after the crash
    r = ar(repo, "run", "-m", "better", "--budget", "0.5")
    assert r.returncode == 0 and "verdict:      keep" in r.stdout, r.stdout + r.stderr
    assert [(x["verdict"], x["seed"]) for x in ledger(repo)] == [("crash", 42), ("keep", 42), ("crash", 42),
                                                                  ("keep", 42)]
    assert gate.free_seeds(ledger(repo), ledger(repo)[-1]["content_hash"], 42, 2) == [43, 44]


# ---------------------------------------------------------------------------
# the noise gate

def test_noise_gate_rejects_a_lucky_noop(repo):
    edit(repo, NOISE=0.01)
    git(repo, "commit", "-qam", "noisy fixture")
    baseline(repo)
    r = ar(repo, "noise", "-n", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    noise = json.load(open(os.path.join(repo, ".autoresearch", "noise.json")))[BRANCH]
    assert len(noise["val_bpb"]) == 4 and noise["std"] > 0  # 3 noise seeds + the baseline's own run
    margin = max(2 * noise["std"], gate.MARGIN_FLOOR)
    best = noise["mean"]  # the baseline's reference value is the mean of all its runs
    bar = gate.bar(margin, 1, 4)  # one run against the mean of four

    # a comment-only edit whose noise draw happens to beat the best, but by less than the bar
    text = read(repo)
    for i in range(2000):
        extra = f"# no-op {i}\n"
        gain = best - fixture_value(text + extra, 42)
        if 0.2 * bar < gain < bar:
            break
    else:
        pytest.fail("no suitable no-op found")
    edit(repo, append=extra)
    r = ar(repo, "run", "-m", "no-op that looks better")
    assert r.returncode == 0 and "verdict:      discard" in r.stdout, r.stdout
    assert "within the noise margin" in r.stdout
    assert not os.path.exists(os.path.join(repo, "x")) and extra not in read(repo)  # reverted


def test_borderline_candidate_is_confirmed_with_more_seeds(repo):
    edit(repo, NOISE=0.01)
    git(repo, "commit", "-qam", "noisy fixture")
    baseline(repo)
    assert ar(repo, "noise", "-n", "2").returncode == 0
    noise = json.load(open(os.path.join(repo, ".autoresearch", "noise.json")))[BRANCH]
    margin, best = max(2 * noise["std"], gate.MARGIN_FLOOR), noise["mean"]
    bar = gate.bar(margin, 1, 3)  # one run against the baseline's three
    text = read(repo)
    for i in range(5000):
        extra = f"# borderline {i}\n"
        if bar < best - fixture_value(text + extra, 42) <= 2 * bar:
            break
    else:
        pytest.fail("no borderline edit found")
    edit(repo, append=extra)
    r = ar(repo, "run", "-m", "borderline")
    assert "confirming with 2 more seed(s)" in r.stdout
    recs = ledger(repo)
    confirms = [x for x in recs if x["kind"] == "confirm"]
    assert [c["seed"] for c in confirms] == [43, 44]
    run = recs[-1]
    mean = (run["val_bpb"] + sum(c["val_bpb"] for c in confirms)) / 3
    assert run["seeds_used"] == 3 and run["val_bpb_mean"] == pytest.approx(mean)
    expected = "keep" if best - mean > gate.bar(margin, 3, 3) else "discard"
    assert run["verdict"] == expected
    assert results(repo)[-1][1] == f"{mean:.6f}" and "[mean of 3 runs]" in results(repo)[-1][4]


def test_judge_rules():
    assert gate.judge(1.0, None, 0.01)[0] == "keep"
    assert gate.judge(0.97, 1.0, 0.01)[0] == "keep"
    assert gate.judge(0.985, 1.0, 0.01)[0] == "borderline"
    assert gate.judge(0.995, 1.0, 0.01)[0] == "discard"
    assert gate.judge(1.005, 1.0, 0.01, simpler=True)[0] == "keep"
    assert gate.judge(1.02, 1.0, 0.01, simpler=True)[0] == "discard"
    # a simplification that is also clearly better says so, and that the gain itself is not confirmed
    verdict, reason = gate.judge(0.97, 1.0, 0.01, simpler=True)
    assert verdict == "keep" and "0.0300 better" in reason and "--rerun" in reason and "within the bar" not in reason
    assert gate.margin(None)[0] == gate.DEFAULT_MARGIN
    assert gate.margin({"std": 0.0001})[0] == gate.MARGIN_FLOOR
    assert gate.margin({"std": 0.01})[0] == pytest.approx(0.02)


# ---------------------------------------------------------------------------
# signals and the lock

@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_stops_child_and_leaves_state_consistent(repo, sig, code):
    base = baseline(repo)
    edited = edit(repo, MODE="hang")
    proc = ar_start(repo, "run", "-m", "will be interrupted")
    log = os.path.join(repo, "run.log")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (os.path.exists(log) and "hanging" in open(log).read()):
        time.sleep(0.05)
    assert "hanging" in open(log).read()

    # the lock: a second command refuses at once
    t0 = time.monotonic()
    second = ar(repo, "run", "-m", "second", "--rerun")
    assert second.returncode == 2 and "already running" in second.stderr
    assert time.monotonic() - t0 < 10

    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == code, out
    assert "verdict:      interrupted" in out
    assert no_orphans()
    assert git(repo, "rev-parse", "HEAD") == base          # candidate commit undone...
    assert read(repo) == edited                             # ...but the edit is still there
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == "M train.py"
    assert ledger(repo)[-1]["verdict"] == "interrupted" and results(repo)[-1][3] == "interrupted"
    # and it can simply be run again (the interrupted run does not count as "already run")
    edit(repo, MODE="good", BPB=0.8)
    r = ar(repo, "run", "-m", "after interrupt")
    assert r.returncode == 0 and "verdict:      keep" in r.stdout


# ---------------------------------------------------------------------------
# damaged files, status, plot

def test_malformed_results_tsv_is_refused_not_damaged(repo):
    baseline(repo)
    path = os.path.join(repo, "results.tsv")
    damaged = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\nabc1234 0.99 keep oops spaces not tabs\n"
    open(path, "w").write(damaged)
    edit(repo, BPB=0.9)
    r = ar(repo, "run", "-m", "x")
    assert r.returncode == 2 and "results.tsv: line 2" in r.stderr and "rebuild-tsv" in r.stderr
    assert open(path).read() == damaged and "BPB = 0.9" in read(repo)
    os.remove(path)
    assert ar(repo, "rebuild-tsv").returncode == 0
    assert [row[3] for row in results(repo)] == ["status", "keep"]


def test_malformed_ledger_is_rebuilt_from_git_or_refused_without_it(repo):
    baseline(repo)
    path = os.path.join(repo, ".autoresearch", "ledger.jsonl")
    good = open(path).read()
    open(path, "a").write("{not json\n")
    r = ar(repo, "status")  # git holds every record: the file is rebuilt from it
    assert r.returncode == 0 and "ledger.jsonl line 2 is not valid JSON" in r.stderr and "git wins" in r.stderr
    assert open(path).read() == good
    git(repo, "update-ref", "-d", "refs/autoresearch/ledger")  # no copy in git: refused, nothing changed
    open(path, "a").write("{not json\n")
    r = ar(repo, "status")
    assert r.returncode == 2 and "ledger.jsonl line 2 is not valid JSON" in r.stderr and "no copy" in r.stderr


def test_a_ledger_record_without_a_verdict_is_skipped_with_a_word(repo):
    baseline(repo)
    edit(repo, BPB=0.9)
    assert ar(repo, "run", "-m", "better").returncode == 0
    from autoresearch import ledger as ledger_module
    odd = {k: v for k, v in ledger(repo)[-1].items() if k not in ("verdict", "seq", "prev")}
    ledger_module.append_record(repo, odd)  # as another tool would write it: in the file and in git's copy
    r = ar(repo, "status")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "no known verdict" in r.stdout and "best:            0.900000" in r.stdout
    for args in (["plot"], ["rebuild-tsv"]):
        r = ar(repo, *args)
        assert r.returncode == 0 and "no known verdict" in r.stdout, r.stderr
    assert [row[3] for row in results(repo)] == ["status", "keep", "keep"]
    edit(repo, BPB=0.95)
    r = ar(repo, "run", "-m", "worse")  # writes results.tsv from the same ledger
    assert r.returncode == 0 and "verdict:      discard" in r.stdout, r.stderr
    assert [row[3] for row in results(repo)] == ["status", "keep", "keep", "discard"]


@pytest.mark.parametrize("noise", [{BRANCH: {"std": "abc"}}, [1, 2], {BRANCH: "x"}, {BRANCH: {"std": -0.01}},
                                   {BRANCH: {"std": float("nan")}}, {BRANCH: {"std": 0.01, "tok_per_sec": "fast"}}])
def test_noise_json_of_the_wrong_shape_is_a_clear_error(repo, noise):
    from autoresearch import ledger as ledger_module

    baseline(repo)
    with open(os.path.join(repo, ".autoresearch", "noise.json"), "w") as f:
        json.dump(noise, f)  # valid JSON (NaN included, as Python writes it)
    with pytest.raises(ledger_module.LedgerError, match="delete it"):
        ledger_module.read_noise(repo, BRANCH)
    head = git(repo, "rev-parse", "HEAD")
    edit(repo, BPB=0.9)
    for args in (["status"], ["plot"], ["run", "-m", "x"]):
        r = ar(repo, *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "noise.json" in r.stderr and "autoresearch noise" in r.stderr and len(r.stderr.splitlines()) == 1
    assert git(repo, "rev-parse", "HEAD") == head and len(ledger(repo)) == 1


def test_plot_into_a_missing_folder(repo):
    baseline(repo)
    r = ar(repo, "plot", "-o", "some/missing/folder/p.png")
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(os.path.join(repo, "some", "missing", "folder", "p.png")) > 0
    r = ar(repo, "plot", "-o", "notes.md/p.png")  # a file where the folder should be: one line
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert "notes.md" in r.stderr and read(repo, "notes.md") == "my notes\n"


@pytest.mark.parametrize("args", [["status"], ["plot"], ["rebuild-tsv"], ["status", "--help"], ["run", "-m", "piped"]])
def test_output_into_a_closed_pipe_exits_quietly(repo, args):
    # `autoresearch status | head -1`: the reader is gone before the output is written (deterministic: the read end
    # is closed before the command starts)
    baseline(repo)
    edit(repo, BPB=0.9)
    if args[0] != "run":
        git(repo, "commit", "-qam", "edit")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        p = subprocess.run([sys.executable, "-m", "autoresearch", *args], cwd=repo, stdout=write_end,
                           stderr=subprocess.PIPE, text=True, env=harness_env(), timeout=60)
    finally:
        os.close(write_end)
    assert "Traceback" not in p.stderr and "BrokenPipeError" not in p.stderr, p.stderr
    if args[0] == "run":  # a closed pipe does not cut an experiment short: it is judged and recorded
        assert p.returncode == 0 and [x["verdict"] for x in ledger(repo)] == ["keep", "keep"]
        assert [row[3] for row in results(repo)] == ["status", "keep", "keep"]


def test_status_piped_into_head(repo):
    baseline(repo)
    for i in range(3):
        edit(repo, BPB=1.1 + i / 100)
        ar(repo, "run", "-m", "worse " + "x" * 70000)  # long lines: more than a pipe holds
    p = subprocess.run(f"{shlex.quote(sys.executable)} -m autoresearch status -n 100 | head -1", shell=True, cwd=repo,
                       capture_output=True, text=True, env=harness_env(), timeout=60)
    assert p.stdout.startswith("branch:") and p.stderr == "", p.stderr


def test_status_counts_and_crash_hint(repo):
    baseline(repo)
    edit(repo, BPB=0.8)
    ar(repo, "run", "-m", "better")
    edit(repo, BPB=0.85)
    ar(repo, "run", "-m", "worse")
    for i in range(3):
        edit(repo, MODE="crash", append=f"# attempt {i}\n")
        assert ar(repo, "run", "-m", f"crash {i}").returncode == 1
    r = ar(repo, "status")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "best:            0.800000" in out and "baseline:        1.000000" in out
    assert "experiments:     6 = 2 kept (baseline included) + 1 discarded + 3 crashed + 0 interrupted" in out
    assert "keep rate:       20%" in out and "experiments/hour" in out
    assert "crashes in row:  3" in out and "hint:" in out


def test_plot_writes_a_nonblank_png(repo):
    import matplotlib.image

    baseline(repo)
    for i, (mode, bpb) in enumerate([("good", 0.9), ("good", 0.95), ("crash", 0.8), ("good", 0.85), ("good", 0.99)]):
        edit(repo, MODE=mode, BPB=bpb, append=f"# {i}\n")
        ar(repo, "run", "-m", f"idea {i}: bpb {bpb}")
    r = ar(repo, "plot")
    assert r.returncode == 0, r.stderr
    png = os.path.join(repo, "progress.png")
    img = matplotlib.image.imread(png)
    assert img.shape[0] > 300 and img.shape[1] > 600
    rgb = img[..., :3]
    assert rgb.std() > 0.05 and (rgb.mean(axis=2) < 0.9).mean() > 0.01  # drawn on, not blank


def test_help_texts_explain_the_gate():
    r = subprocess.run([sys.executable, "-m", "autoresearch", "run", "--help"], capture_output=True, text=True,
                       env=harness_env())
    assert r.returncode == 0 and "margin" in r.stdout and "baseline" in r.stdout
    for cmd in ("noise", "status", "plot"):
        assert subprocess.run([sys.executable, "-m", "autoresearch", cmd, "--help"], capture_output=True,
                              env=harness_env()).returncode == 0
