"""
The record survives train.py and accidents (issue 23): a missing, truncated or edited ledger is rebuilt from git's
copy (refs/autoresearch/ledger), a branch whose records are gone altogether is refused rather than given a free
baseline, and a candidate commit left behind by a harness killed mid-run is undone. Against the fixture train.py,
like test_harness.py; the branch with a history is made once and copied for each test.
"""

import json
import os
import shutil
import time

import pytest

from autoresearch import gitops, ledger as ledger_mod
from test_harness import (BRANCH, add_fixture_files, ar, ar_start, edit, git, ledger, no_orphans, read, repo,  # noqa: F401
                          results)

REF = "refs/autoresearch/ledger"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A branch with a history: baseline, two keeps, a discard, a crash (5 experiments, 2 harness commits kept)."""
    path = tmp_path_factory.mktemp("made") / "repo"
    path.mkdir()
    repo = str(path)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "test@example.com")
    git(repo, "config", "user.name", "test")
    add_fixture_files(path)
    (path / ".gitignore").write_text("results.tsv\nrun.log\nprogress.png\n.autoresearch/\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "initial")
    git(repo, "checkout", "-q", "-b", BRANCH)
    for message, consts in [("baseline", {}), ("better", {"BPB": 0.9}), ("better still", {"BPB": 0.8}),
                            ("worse", {"BPB": 0.85}), ("broken", {"MODE": "crash", "BPB": 0.7})]:
        if consts:
            edit(repo, **consts)
        r = ar(repo, "run", "-m", message)
        assert r.returncode in (0, 1), r.stdout + r.stderr
    return repo


@pytest.fixture
def branch(made, tmp_path):
    path = str(tmp_path / "copy")
    shutil.copytree(made, path, symlinks=True)
    return path


def ledger_file(repo):
    return os.path.join(repo, ".autoresearch", "ledger.jsonl")


def lines(repo):
    with open(ledger_file(repo)) as f:
        return f.read().splitlines()


def write_lines(repo, text_lines):
    with open(ledger_file(repo), "w") as f:
        f.write("".join(line + "\n" for line in text_lines))


def backups(repo):
    return [f for f in os.listdir(os.path.join(repo, ".autoresearch")) if f.startswith("ledger.jsonl.replaced-")]


def rows(repo):
    return results(repo)[1:]


def run_next(repo, bpb=0.75):
    """The next experiment: must be judged against the branch's real best, never a baseline."""
    edit(repo, MODE="good", BPB=bpb)
    r = ar(repo, "run", "-m", f"bpb {bpb}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "best_before:  0.800000" in r.stdout and "baseline" not in r.stdout, r.stdout
    assert "verdict:      keep" in r.stdout and "#6 on" in r.stdout
    return r


def one_line(stderr, *needles):
    notes = [line for line in stderr.splitlines() if line.startswith("autoresearch:")]
    assert len(notes) == 1, stderr
    for needle in needles:
        assert needle in notes[0], notes[0]
    return notes[0]


# ---------------------------------------------------------------------------
# what is stored, and what it costs

def test_every_record_is_chained_and_in_git(branch):
    recs = ledger(branch)
    assert [r["seq"] for r in recs] == list(range(len(recs))) and recs[0]["prev"] is None
    assert all(r["prev"] == ledger_mod.record_hash(p) for p, r in zip(recs, recs[1:]))
    assert gitops.ledger_lines(branch) == lines(branch)  # git's copy: the same lines, in the same order
    assert int(git(branch, "rev-list", "--count", REF)) == len(recs)
    assert ledger_mod.chain_break(recs) is None
    edited = [dict(r) for r in recs]
    edited[2]["val_bpb"] = 0.5
    assert ledger_mod.chain_break(edited)[0] == 3  # the record after an edited one no longer names it
    assert ledger_mod.chain_break(recs[:2] + recs[3:])[0] == 2


def test_harness_commits_carry_trailers(branch):
    log = git(branch, "log", "--format=%(trailers:only,unfold)%x1e", f"main..{BRANCH}").split("\x1e")
    kept = [t for t in (gitops.parse_trailers(x) for x in log) if t]
    assert [t["Autoresearch-Experiment"] for t in kept] == ["3", "2"]  # the two kept candidates, newest first
    assert all(t["Autoresearch-Branch"] == BRANCH for t in kept)
    assert git(branch, "log", "-1", "--format=%s") == "better still"  # the subject is still the description


def test_cost_per_record(branch, capsys):
    rec = {k: v for k, v in ledger(branch)[-1].items() if k not in ("seq", "prev")}
    n = 30
    t0 = time.perf_counter()
    for _ in range(n):
        ledger_mod.append_record(branch, rec)
    per_append = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(10):
        records = ledger_mod.read_ledger(branch)
    per_read = (time.perf_counter() - t0) / 10
    assert len(records) == 5 + n and ledger_mod.chain_break(records) is None
    with capsys.disabled():
        print(f"\nledger: {per_append * 1e3:.1f} ms per record appended, {per_read * 1e3:.1f} ms per read of "
              f"{len(records)} records")
    assert per_append < 0.5 and per_read < 0.5


# ---------------------------------------------------------------------------
# the file lost or damaged, git's copy intact: rebuilt, the next run judged against the real best

def test_deleted_state_dir_is_rebuilt_and_no_baseline_is_free(branch):
    before = rows(branch)
    shutil.rmtree(os.path.join(branch, ".autoresearch"))
    r = run_next(branch)
    one_line(r.stderr, "ledger.jsonl is missing", "rebuilt it from the 5 record(s)", "results.tsv rewritten")
    assert rows(branch)[:5] == before and len(rows(branch)) == 6
    assert [x["exp"] for x in ledger(branch) if x["kind"] == "run"] == [1, 2, 3, 4, 5, 6]


def test_truncated_ledger_is_rebuilt(branch):
    before, full = rows(branch), lines(branch)
    write_lines(branch, full[:2])
    r = ar(branch, "status")
    assert r.returncode == 0 and "experiments:     5 = 3 kept" in r.stdout, r.stdout + r.stderr
    one_line(r.stderr, "lacks the last 3 of the 5 records git holds (truncated", "rebuilt it from the 5 record(s)")
    assert lines(branch) == full and rows(branch) == before
    assert backups(branch) == []  # it held nothing git does not
    assert ar(branch, "status").stderr == ""  # rebuilt once: quiet from then on


def test_edited_val_bpb_in_the_file_loses_to_git(branch):
    before, full = rows(branch), lines(branch)
    recs = [json.loads(x) for x in full]
    recs[3]["val_bpb"] = 0.1  # the discard made to look like the best
    write_lines(branch, [ledger_mod.dumps(x) for x in recs])
    r = run_next(branch)
    one_line(r.stderr, "line 4 (record 3, experiment #4, commit", "differs from git's copy in val_bpb", "git wins",
             "the old file kept as .autoresearch/ledger.jsonl.replaced-")
    assert lines(branch)[:5] == full and rows(branch)[:5] == before
    assert len(backups(branch)) == 1  # the file it replaced, for a human to look at


def test_removed_middle_line_is_put_back(branch):
    before, full = rows(branch), lines(branch)
    write_lines(branch, full[:2] + full[3:])
    r = ar(branch, "rebuild-tsv")
    assert r.returncode == 0
    one_line(r.stderr, "lacks record 2, experiment #3", "a line removed")
    assert lines(branch) == full and rows(branch) == before


def test_lines_added_to_the_file_are_dropped(branch):
    # a record git does not hold (train.py can write the file, not .git): dropped, even with a valid chain
    full = lines(branch)
    forged = dict(json.loads(full[-1]), exp=6, verdict="keep", val_bpb=0.1, commit="f" * 40, description="forged")
    forged = ledger_mod._chained(forged, json.loads(full[-1]))
    write_lines(branch, full + [ledger_mod.dumps(forged)])
    r = ar(branch, "status")
    one_line(r.stderr, "1 line(s) after git's last record (from line 6) that git does not hold")
    assert lines(branch) == full and "forged" not in r.stdout


def test_a_file_damaged_during_a_run_is_rewritten_when_the_record_is_added(branch):
    # train.py can reach the file while it runs: the record goes to git, and a file that no longer ends where git's
    # copy did is rewritten from git rather than appended to
    full = lines(branch)
    write_lines(branch, full[:3])
    rec = {k: v for k, v in json.loads(full[-1]).items() if k not in ("seq", "prev")}
    stored = ledger_mod.append_record(branch, rec)
    assert stored["seq"] == 5 and lines(branch) == full + [ledger_mod.dumps(stored)]
    assert gitops.ledger_lines(branch) == lines(branch)


def test_worktrees_of_one_repository_share_git_s_copy(branch, tmp_path):
    # each worktree has its own .autoresearch/; refs/autoresearch/ledger is the repository's, so a worktree's file is
    # brought up to date with the records another one added (one line), and a branch moved between worktrees keeps them
    other = str(tmp_path / "other")
    git(branch, "worktree", "add", "-q", "-b", "autoresearch/other", other, "main")
    r = ar(other, "run", "-m", "baseline in the other worktree")
    assert r.returncode == 0 and "baseline" in r.stdout, r.stdout + r.stderr
    one_line(r.stderr, "ledger.jsonl is missing: rebuilt it from the 5 record(s)")
    assert len(rows(other)) == 6  # the repository's experiments, both branches
    r = run_next(branch)
    one_line(r.stderr, "lacks the last 1 of the 6 records git holds", "another worktree")
    assert [x[4] for x in rows(branch)][-2:] == ["baseline in the other worktree", "bpb 0.75"]
    assert backups(branch) == [] and gitops.ledger_lines(branch) == lines(branch)


# ---------------------------------------------------------------------------
# nothing left to rebuild from: refused, never a free baseline

def test_edited_file_without_a_git_copy_is_refused(branch):
    git(branch, "update-ref", "-d", REF)
    full = lines(branch)
    recs = [json.loads(x) for x in full]
    recs[1]["val_bpb"] = 0.1
    write_lines(branch, [ledger_mod.dumps(x) for x in recs])
    r = ar(branch, "status")
    assert r.returncode == 2, r.stdout
    one_line(r.stderr, "line 3 breaks the ledger's chain", "git holds no copy", "Restore the file from a backup")


def test_everything_lost_is_refused_not_a_baseline(branch):
    head, before = git(branch, "rev-parse", "HEAD"), rows(branch)
    git(branch, "update-ref", "-d", REF)
    shutil.rmtree(os.path.join(branch, ".autoresearch"))
    text = edit(branch, BPB=0.95)
    r = ar(branch, "run", "-m", "would be a free baseline")
    assert r.returncode == 2
    one_line(r.stderr, "results.tsv lists 5 experiments but the ledger holds 0", "records were lost")
    assert rows(branch) == before and git(branch, "rev-parse", "HEAD") == head and read(branch) == text
    os.remove(os.path.join(branch, "results.tsv"))  # the view gone too: git's history still shows the branch
    r = ar(branch, "run", "-m", "would be a free baseline")
    assert r.returncode == 2
    one_line(r.stderr, f"branch {BRANCH} has 2 commit(s) the harness made", "experiment #3", "free baseline",
             "git checkout -b autoresearch/<new-tag>")
    assert git(branch, "rev-parse", "HEAD") == head and not os.path.exists(ledger_file(branch))
    # a new branch from here has no harness commits of its own: its baseline is a real one
    git(branch, "checkout", "-q", "-b", "autoresearch/fresh")
    r = ar(branch, "run", "-m", "baseline of a new branch")
    assert r.returncode == 0 and "baseline" in r.stdout, r.stdout + r.stderr


def test_a_ledger_from_before_git_kept_a_copy_is_stored_there(branch):
    before = rows(branch)
    legacy = [{k: v for k, v in json.loads(x).items() if k not in ("seq", "prev")} for x in lines(branch)]
    git(branch, "update-ref", "-d", REF)
    write_lines(branch, [ledger_mod.dumps(x) for x in legacy])
    r = ar(branch, "status")
    assert r.returncode == 0
    one_line(r.stderr, "stored the ledger's 5 record(s) in git")
    assert [json.loads(x)["seq"] for x in lines(branch)] == [0, 1, 2, 3, 4]
    assert gitops.ledger_lines(branch) == lines(branch)
    assert rows(branch) == before
    run_next(branch)


# ---------------------------------------------------------------------------
# a harness killed mid-run: its candidate commit is undone, its train.py left to run again

def commit_candidate(repo, exp, **consts):
    text = edit(repo, **consts)
    trailers = f"Autoresearch-Branch: {BRANCH}\nAutoresearch-Experiment: {exp}"
    git(repo, "commit", "-q", "-m", "killed idea", "-m", trailers, "--", "train.py")
    return text


def test_candidate_left_by_a_killed_harness_is_undone(branch):
    kept, before = git(branch, "rev-parse", "HEAD"), rows(branch)
    text = commit_candidate(branch, 6, BPB=0.75, MODE="good")
    r = ar(branch, "status")  # read-only: says so, changes nothing
    assert r.returncode == 0 and "HEAD is the candidate commit of experiment #6, never recorded" in r.stdout
    assert git(branch, "log", "-1", "--format=%s") == "killed idea"
    r = ar(branch, "run", "-m", "the killed idea, again")
    one_line(r.stderr, "was the candidate commit of experiment #6, never recorded", "commit undone",
             "train.py left in the working tree")
    assert r.returncode == 0 and "best_before:  0.800000" in r.stdout and "verdict:      keep" in r.stdout, r.stdout
    assert git(branch, "rev-parse", "HEAD~1") == kept and read(branch) == text
    assert rows(branch)[:5] == before and len(rows(branch)) == 6


def test_noise_after_a_killed_run_leaves_the_edit_to_run(branch):
    kept = git(branch, "rev-parse", "HEAD")
    text = commit_candidate(branch, 6, BPB=0.75, MODE="good")
    r = ar(branch, "noise", "-n", "2")
    assert r.returncode == 2 and "uncommitted changes" in r.stderr  # noise measures committed code only
    assert "never recorded" in r.stderr and git(branch, "rev-parse", "HEAD") == kept and read(branch) == text


def test_harness_killed_during_its_run(branch):
    kept, before = git(branch, "rev-parse", "HEAD"), rows(branch)
    text = edit(branch, MODE="hang", BPB=0.75)
    proc = ar_start(branch, "run", "-m", "killed with -9")
    log = os.path.join(branch, "run.log")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (os.path.exists(log) and "hanging" in open(log).read()):
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no bookkeeping at all
    proc.wait()
    # train.py and what it started die with the harness (bubblewrap's --die-with-parent, its own PID namespace)
    assert no_orphans(wait=10), "train.py's processes outlived the killed harness"
    assert git(branch, "log", "-1", "--format=%s") == "killed with -9" and len(ledger(branch)) == 5
    edit(branch, MODE="good")
    r = ar(branch, "run", "-m", "after the kill")
    one_line(r.stderr, "experiment #6, never recorded", "commit undone")
    assert r.returncode == 0 and "verdict:      keep" in r.stdout and "best_before:  0.800000" in r.stdout, r.stdout
    assert git(branch, "rev-parse", "HEAD~1") == kept and read(branch) == text.replace("'hang'", "'good'")
    assert rows(branch)[:5] == before and len(rows(branch)) == 6


def test_harness_killed_during_the_baseline(repo):
    base = git(repo, "rev-parse", "HEAD")
    commit_candidate(repo, 1, BPB=0.9)
    r = ar(repo, "run", "-m", "baseline")
    one_line(r.stderr, "experiment #1, never recorded", "commit undone")
    assert r.returncode == 0 and "baseline" in r.stdout and git(repo, "rev-parse", "HEAD~1") == base
    assert [x[3] for x in rows(repo)] == ["keep"]


def test_a_parallel_candidate_still_queued_is_left_to_the_coordinator(branch):
    kept = git(branch, "rev-parse", "HEAD")
    edit(branch, BPB=0.75)
    git(branch, "commit", "-q", "-m", "queued idea", "-m", f"Autoresearch-Branch: {BRANCH}\nAutoresearch-Candidate: c1",
        "--", "train.py")
    candidate = git(branch, "rev-parse", "HEAD")
    queue = os.path.join(branch, ".autoresearch", "queue.jsonl")
    with open(queue, "w") as f:  # the coordinator moved the branch to c1 and was killed before recording it
        f.write(json.dumps({"event": "submit", "id": "c1", "branch": BRANCH, "commit": candidate, "base": kept,
                            "seed": 42}) + "\n")
    r = ar(branch, "run", "-m", "x")
    assert r.returncode == 2 and git(branch, "rev-parse", "HEAD") == candidate
    one_line(r.stderr, "is candidate c1, kept by the parallel-mode coordinator", "autoresearch wait")
    os.remove(queue)  # not queued any more (the queue lost too): undone like a run's candidate
    r = ar(branch, "run", "-m", "the queued idea, run here")
    one_line(r.stderr, "candidate commit of candidate c1, never recorded", "commit undone")
    assert r.returncode == 0 and "verdict:      keep" in r.stdout and git(branch, "rev-parse", "HEAD~1") == kept
