"""
Parallel mode (`autoresearch submit / wait / serve / stop`) on a local Ray cluster with 2 CPU workers, against the
fixture train.py in throwaway git repositories. Offline; the cluster is started once for the module and each
test's coordinator joins it with --address, which is also how a multi-machine cluster is used.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from test_harness import ROOT, edit, git, harness_env, ledger, read, repo, results  # noqa: F401 (repo: fixture)

ray = pytest.importorskip("ray", reason="parallel mode needs Ray: uv sync --extra parallel")

WORKERS = 2


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def prepo(repo, cluster):
    """A repository whose coordinator joins the module's cluster; stopped at the end of the test."""
    env = {**harness_env(), "AUTORESEARCH_RAY_ADDRESS": cluster, "AUTORESEARCH_WORKERS": str(WORKERS),
           "AUTORESEARCH_IDLE": "30"}
    yield repo, env
    subprocess.run([sys.executable, "-m", "autoresearch", "stop"], cwd=repo, env=env, capture_output=True, timeout=90)


def ar(prepo, *args, timeout=120):
    repo, env = prepo
    return subprocess.run([sys.executable, "-m", "autoresearch", *args], cwd=repo, capture_output=True, text=True,
                          env=env, timeout=timeout)


def submit(prepo, message, *args, **consts):
    if consts:
        edit(prepo[0], **consts)
    r = ar(prepo, "submit", "-m", message, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.split("submitted ")[1].split(":")[0]


def events(repo, kind=None):
    path = os.path.join(repo, ".autoresearch", "queue.jsonl")
    with open(path) as f:
        evs = [json.loads(line) for line in f]
    return [e for e in evs if kind is None or e["event"] == kind]


def runs(repo):
    if not os.path.exists(os.path.join(repo, ".autoresearch", "ledger.jsonl")):
        return []
    return [r for r in ledger(repo) if r["kind"] == "run"]


def until(condition, timeout=60, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def serve_state(repo):
    try:
        with open(os.path.join(repo, ".autoresearch", "serve.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


KILLED = set()


def worker_running(repo, cid, attempt):
    """The pid of the worker running candidate `cid` in its `attempt`-th start, once it runs."""
    if len([e for e in events(repo, "start") if e["id"] == cid]) < attempt:
        return None
    state = serve_state(repo) or {"workers": []}
    return next((w["pid"] for w in state["workers"] if (w.get("job") or {}).get("id") == cid
                 and w.get("pid") and w["pid"] not in KILLED), None)


def kill_worker(pid):
    KILLED.add(pid)
    os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------

def test_four_candidates_on_two_workers(prepo):
    repo = prepo[0]
    base = git(repo, "rev-parse", "HEAD")
    c1 = submit(prepo, "baseline")
    assert git(repo, "rev-parse", "HEAD") == base and git(repo, "status", "--porcelain", "--untracked-files=no") == ""
    c2 = submit(prepo, "better", BPB=0.9, SLEEP=0.5)
    assert "BPB = 1.0" in read(repo)  # restored to the best right away, the branch did not move
    assert git(repo, "rev-parse", "HEAD") == base
    c3 = submit(prepo, "best, slow", BPB=0.8, SLEEP=4.0)
    best_text = git(repo, "show", f"refs/autoresearch/candidates/{c3}:train.py")
    c4 = submit(prepo, "crash", MODE="crash")
    r = ar(prepo, "wait", "--all")
    assert r.returncode == 0, r.stdout + r.stderr
    for cid in (c1, c2, c3, c4):
        assert f"--- {cid}:" in r.stdout

    recs = runs(repo)
    assert sorted(x["candidate"] for x in recs) == sorted([c1, c2, c3, c4])
    assert [row[3] for row in results(repo)[1:]] == [x["verdict"] for x in recs]
    verdicts = {x["candidate"]: x["verdict"] for x in recs}
    assert verdicts == {c1: "keep", c2: "keep", c3: "keep", c4: "crash"}
    assert {x["worker"] for x in recs} == {0, 1}  # both workers were used
    # c3 was submitted on the baseline but finished after c2 was kept: judged against c2, committed on top of it
    c3_rec = next(x for x in recs if x["candidate"] == c3)
    c2_rec = next(x for x in recs if x["candidate"] == c2)
    assert c3_rec["best_before"] == pytest.approx(0.9)
    tip = git(repo, "rev-parse", "HEAD")
    assert c3_rec["commit"] == tip and git(repo, "rev-parse", "HEAD~1") == c2_rec["commit"]
    assert git(repo, "show", "HEAD:train.py") == best_text
    assert read(repo).rstrip("\n") == best_text  # wait brought the unedited train.py to the new best
    status = ar(prepo, "status")
    assert "0.800000" in status.stdout and "queue:           0 waiting, 0 running" in status.stdout
    # the same content is never queued twice (a crash's may be: a crash can be a fluke)
    with open(os.path.join(repo, "train.py"), "wb") as f:
        f.write(subprocess.run(["git", "show", f"refs/autoresearch/candidates/{c2}:train.py"], cwd=repo,
                               capture_output=True, check=True).stdout)
    r = ar(prepo, "submit", "-m", "better again")
    assert r.returncode == 2 and "already run" in r.stderr


def test_killed_worker_gets_one_retry_then_a_crash_row(prepo):
    repo = prepo[0]
    c1 = submit(prepo, "survives one kill", SLEEP=3.0)
    c2 = submit(prepo, "killed twice", SLEEP=60.0, BPB=0.5)
    kill_worker(until(lambda: worker_running(repo, c1, 1), what="c1 running"))
    for attempt in (1, 2):
        kill_worker(until(lambda: worker_running(repo, c2, attempt), what=f"c2 attempt {attempt}"))
    r = ar(prepo, "wait", "--all")
    assert r.returncode == 0, r.stdout + r.stderr
    recs = {x["candidate"]: x for x in runs(repo)}
    assert recs[c1]["verdict"] == "keep" and recs[c2]["verdict"] == "crash"
    assert "worker lost 2 times" in recs[c2]["reason"]
    assert len(results(repo)) == 3
    starts = [e["id"] for e in events(repo, "start")]
    assert starts.count(c1) == 2 and starts.count(c2) == 2
    assert git(repo, "rev-parse", "HEAD") == recs[c1]["commit"]


def test_killed_coordinator_and_interrupted_wait_lose_nothing(prepo):
    repo = prepo[0]
    c1 = submit(prepo, "quick")
    c2 = submit(prepo, "slow", SLEEP=60.0, BPB=0.9)
    until(lambda: runs(repo), what="c1's verdict")
    pid = until(lambda: worker_running(repo, c2, 1) and serve_state(repo)["pid"], what="c2 running")
    KILLED.update(w.get("pid") for w in serve_state(repo)["workers"])  # its workers die with it
    os.kill(pid, signal.SIGKILL)  # the coordinator dies mid-run
    until(lambda: ar(prepo, "status").stdout.count("no coordinator running"), what="coordinator gone")

    edit(repo, SLEEP=1.0, BPB=0.9, append="# faster\n")
    c3 = submit(prepo, "resumed with a new one")  # starts a fresh coordinator, which resumes c2 too
    waiter = subprocess.Popen([sys.executable, "-m", "autoresearch", "wait"], cwd=repo, env=prepo[1],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.5)
    waiter.send_signal(signal.SIGINT)  # Ctrl-C on wait
    out, _ = waiter.communicate(timeout=30)
    assert waiter.returncode in (0, 130), out
    kill_worker(until(lambda: worker_running(repo, c2, 2), what="c2 retried"))  # its last attempt
    r = ar(prepo, "wait", "--all")
    assert r.returncode == 0, r.stdout + r.stderr
    shown = out + r.stdout
    for cid in (c1, c2, c3):  # every verdict printed, at least once, even around the Ctrl-C
        assert f"--- {cid}:" in shown
    recs = runs(repo)
    assert sorted(x["candidate"] for x in recs) == sorted([c1, c2, c3])  # one row each, no duplicates
    assert len(results(repo)) == 4
    assert [e["id"] for e in events(repo, "start")].count(c1) == 1  # finished work is never run again
    verdicts = {x["candidate"]: x["verdict"] for x in recs}
    assert verdicts == {c1: "keep", c2: "crash", c3: "keep"}


def test_borderline_candidate_is_confirmed_with_more_seeds(prepo):
    repo = prepo[0]
    submit(prepo, "baseline")
    assert ar(prepo, "wait", "--all").returncode == 0  # the baseline must be judged first, or the candidate becomes it
    cid = submit(prepo, "a little better", "--margin", "0.05", BPB=0.93)  # gain 0.07: between margin and 2x
    r = ar(prepo, "wait", "--all")
    assert r.returncode == 0, r.stdout + r.stderr
    rec = next(x for x in runs(repo) if x["candidate"] == cid)
    assert rec["verdict"] == "keep" and rec["seeds_used"] == 3 and "confirmed" in rec["reason"]
    assert sorted(x["seed"] for x in ledger(repo) if x["kind"] == "confirm") == [43, 44]
    assert len(results(repo)) == 3 and "[mean of 3 runs]" in results(repo)[-1][4]


def test_cli_without_ray(tmp_path, monkeypatch):
    # the single-GPU path never imports Ray, and parallel mode says how to get it
    code = "import sys, autoresearch.cli; autoresearch.cli.build_parser(); assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=harness_env())
    from autoresearch import parallel
    from autoresearch.common import Refusal
    monkeypatch.setattr(parallel.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(Refusal, match="uv sync --extra parallel"):
        parallel.need_ray()


def test_rerun_of_the_kept_commit_is_a_measurement(prepo):
    repo = prepo[0]
    submit(prepo, "baseline")
    assert ar(prepo, "wait", "--all").returncode == 0
    head = git(repo, "rev-parse", "HEAD")
    cid = submit(prepo, "baseline again", "--rerun")
    r = ar(prepo, "wait", "--all")
    assert f"--- {cid}:" in r.stdout and "verdict:      remeasure" in r.stdout, r.stdout
    assert git(repo, "rev-parse", "HEAD") == head and len(results(repo)) == 2  # one row: the pooled mean
    assert "[mean of 2 runs]" in results(repo)[1][4]
    assert "experiments:     1 = 1 kept" in ar(prepo, "status").stdout
