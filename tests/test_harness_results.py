"""
Results that mean something (issue 15, the harness's items): runs are compared only with runs of the same
settings, pooled by train.py content, shown with the same numbers everywhere; no edit is lost to a revert and no
bad setting gets as far as a commit. Against the fixture train.py, like test_harness.py.
"""

import json
import math
import os
import re
import statistics
import time

import pytest

from autoresearch import gate, runner
from test_harness import ar, ar_start, baseline, edit, git, ledger, read, repo, results  # noqa: F401 (repo: fixture)


def runs(repo):
    return [r for r in ledger(repo) if r["kind"] == "run"]


def unchanged(repo, head, text, n_records):
    """Nothing changed: same HEAD, same train.py, no new record."""
    assert git(repo, "rev-parse", "HEAD") == head and read(repo) == text
    path = os.path.join(repo, ".autoresearch", "ledger.jsonl")
    assert (len(ledger(repo)) if os.path.exists(path) else 0) == n_records


# ---------------------------------------------------------------------------
# item 4: only runs of the same settings are compared

def test_every_record_has_its_settings(repo):
    baseline(repo)
    rec = ledger(repo)[0]
    assert rec["settings"]["budget"] == 300 and rec["settings"]["eval_tokens"] == 16384
    assert rec["settings"]["device"] and "corpus" in rec["settings"]


@pytest.mark.parametrize("args,env,what", [
    (["--budget", "40"], {}, "budget 40.0 vs 300"),
    ([], {"AUTORESEARCH_TIME_BUDGET": "40"}, "budget 40.0 vs 300"),
    ([], {"AUTORESEARCH_EVAL_TOKENS": "8192"}, "eval_request 8192 vs default"),
])
def test_other_settings_are_refused_before_anything_changes(repo, args, env, what):
    baseline(repo)
    text = edit(repo, BPB=0.5)
    head = git(repo, "rev-parse", "HEAD")
    r = ar(repo, "run", "-m", "longer budget", *args, env=env)
    assert r.returncode == 2 and what in r.stderr and "git checkout -b autoresearch/" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    unchanged(repo, head, text, 1)


def test_another_corpus_is_refused(repo, tmp_path):
    cache = tmp_path / "cache"
    (cache / "data").mkdir(parents=True)
    (cache / "data" / "source.json").write_text(json.dumps({"source": "local", "sha256": "aaa"}))
    env = {"AUTORESEARCH_CACHE": str(cache)}
    baseline_rec = ar(repo, "run", "-m", "baseline", env=env)
    assert baseline_rec.returncode == 0 and ledger(repo)[0]["settings"]["corpus"]["sha256"] == "aaa"
    (cache / "data" / "source.json").write_text(json.dumps({"source": "local", "sha256": "bbb"}))
    text = edit(repo, BPB=0.5)
    head = git(repo, "rev-parse", "HEAD")
    r = ar(repo, "run", "-m", "on another corpus", env=env)
    assert r.returncode == 2 and "corpus" in r.stderr and "new baseline" in r.stderr
    unchanged(repo, head, text, 1)
    git(repo, "checkout", "train.py")
    r = ar(repo, "noise", "-n", "2", env=env)  # noise runs would join the pool: refused too
    assert r.returncode == 2 and "corpus" in r.stderr


def test_committed_changes_to_the_fixed_modules_are_refused(repo):
    # the metric lives in prepare.py: a committed edit there (here: a new file among the fixed modules) would make
    # every later val_bpb incomparable with the best's, although train.py alone looks changed
    base = baseline(repo)
    assert len(ledger(repo)[0]["settings"]["fixed_files"]) == 12
    with open(os.path.join(repo, "prepare.py"), "w") as f:
        f.write("def evaluate_bpb(*args):\n    return 0.9 * 1.0  # a kinder metric\n")
    git(repo, "add", "prepare.py")
    git(repo, "commit", "-q", "-m", "tweak the metric")
    text = edit(repo, BPB=0.5)
    head = git(repo, "rev-parse", "HEAD")
    r = ar(repo, "run", "-m", "better?")
    assert r.returncode == 2 and "fixed_files" in r.stderr, r.stderr
    assert f"git checkout {base[:12]} -- prepare.py data_cache.py" in r.stderr
    unchanged(repo, head, text, 1)
    git(repo, "rm", "-q", "prepare.py")  # the fixed modules as the best kept run had them (none, here)
    git(repo, "commit", "-q", "-m", "restore")
    r = ar(repo, "run", "-m", "better, on the same metric")
    assert r.returncode == 0 and "verdict:      keep" in r.stdout, r.stdout + r.stderr


def test_fewer_untimed_steps_are_compared(repo):
    # starting the clock earlier only moves compilation into the budget: no advantage, still the same measurement
    baseline(repo)
    edit(repo, BPB=0.5, UNTIMED=1)
    r = ar(repo, "run", "-m", "fewer untimed steps")
    assert r.returncode == 0 and "verdict:      keep" in r.stdout, r.stdout


def test_more_than_two_untimed_steps_is_a_crash_even_as_a_baseline(repo):
    # free training outside the budget: no result, also on a fresh branch where nothing could be compared
    edit(repo, BPB=0.5, UNTIMED=6)
    git(repo, "commit", "-qam", "six untimed steps")
    r = ar(repo, "run", "-m", "baseline with 6 untimed steps")
    assert r.returncode == 1 and "verdict:      crash" in r.stdout and "trained 6 steps before its clock" in r.stdout, \
        r.stdout
    assert not [x for x in runs(repo) if x["verdict"] == "keep"]


# ---------------------------------------------------------------------------
# item 5 and item 3: throughput and start-up in every verdict

def test_verdicts_and_noise_show_steps_and_tok_s_and_warn_on_a_change(repo):
    # tok/s is the harness's: tokens reported by the steps over the training seconds on its own clock
    baseline(repo)
    r = ar(repo, "noise", "-n", "2")
    assert r.returncode == 0 and "3 steps, " in r.stdout and "15%" in r.stdout, r.stdout
    noise_tps = json.load(open(os.path.join(repo, ".autoresearch", "noise.json")))["autoresearch/test"]["tok_per_sec"]
    assert 3000 / 0.6 < noise_tps <= 3000 / 0.3  # 3 steps of 0.1 s and the hand-over

    edit(repo, BPB=1.5, TOKENS_PER_STEP=950)  # 5 % slower: within the tolerance
    r = ar(repo, "run", "-m", "a bit slower")
    assert "throughput:   3 steps, " in r.stdout and "warning:" not in r.stdout, r.stdout

    edit(repo, BPB=1.5, TOKENS_PER_STEP=500)  # half as fast: the machine is busier than when noise was measured
    r = ar(repo, "run", "-m", "much slower")
    assert re.search(r"warning:      tok/s [\d,]+ is \d+% below the noise runs'", r.stdout), r.stdout
    assert "measure noise again (`autoresearch noise`)" in r.stdout
    assert runs(repo)[-1]["tok_per_sec"] < 0.7 * noise_tps and runs(repo)[-1]["warnings"]


def test_the_header_shows_the_bar_the_verdict_will_use_against_a_pooled_best(repo):
    baseline(repo)
    assert ar(repo, "noise", "-n", "2").returncode == 0  # the best is now a mean of 3 runs
    edit(repo, BPB=1.5)
    r = ar(repo, "run", "-m", "worse")
    reason = next(line for line in r.stdout.splitlines() if line.startswith("reason:"))
    bar = reason.rsplit("bar ", 1)[1].rstrip(")")
    assert f"bar {bar} for 1 run vs the best's 3" in r.stdout.split("---")[0], r.stdout


def test_start_up_is_the_harness_s_and_work_before_the_clock_is_a_crash(repo):
    baseline(repo)
    edit(repo, BPB=1.5, STARTUP=1.0)  # a second of start-up: within the allowance
    r = ar(repo, "run", "-m", "slower start")
    assert "start-up 1 s" in r.stdout and runs(repo)[-1]["startup_seconds"] >= 1.0, r.stdout
    edit(repo, BPB=0.5, STARTUP=runner.STARTUP_ALLOWANCE + 1)  # work bought outside the budget
    r = ar(repo, "run", "-m", "precompute before the timer")
    assert r.returncode == 1 and "verdict:      crash" in r.stdout and "before its training clock started" in r.stdout
    assert runs(repo)[-1]["verdict"] == "crash" and runs(repo)[-1]["startup_seconds"] > runner.STARTUP_ALLOWANCE


# ---------------------------------------------------------------------------
# item 6: pools of runs, means against means

def test_means_against_means():
    m = 0.01
    assert gate.bar(m, 1, 1) == pytest.approx(m)
    assert gate.bar(m, 4, 4) == pytest.approx(m / 2)
    assert gate.judge(0.985, 1.0, m)[0] == "borderline"                  # one run against one
    assert gate.judge(0.985, 1.0, m, n=4, n_best=4)[0] == "keep"         # four against four: clear
    assert gate.judge(0.997, 1.0, m, n=4, n_best=4)[0] == "discard"
    # a rerun's earlier runs join its pool: the verdict rests on the mean of all of them
    verdict, _, values, _ = gate.decide([(43, 0.99)], 1.0, m, prior=[0.98, 0.97, 0.98], n_best=4)
    assert values == [0.98, 0.97, 0.98, 0.99] and verdict == "keep"


def test_pool_counts_each_seed_once():
    recs = [{"kind": "noise", "content_hash": "h", "seed": 42, "verdict": "noise", "val_bpb": 1.0},
            {"kind": "noise", "content_hash": "h", "seed": 42, "verdict": "noise", "val_bpb": 1.2},
            {"kind": "noise", "content_hash": "h", "seed": 43, "verdict": "crash", "val_bpb": None},
            {"kind": "noise", "content_hash": "h", "seed": 44, "verdict": "noise", "val_bpb": 1.1}]
    assert gate.pool(recs, "h") == [1.2, 1.1]
    assert gate.free_seeds(recs, "h", 42, 3) == [43, 45, 46]  # the crash put nothing in the pool: 43 is free


def test_rerun_adds_a_run_to_the_pool(repo):
    edit(repo, NOISE=0.05)
    git(repo, "commit", "-qam", "noisy fixture")
    baseline(repo)
    edit(repo, BPB=1.1)
    assert ar(repo, "run", "-m", "worse").returncode == 0
    edit(repo, BPB=1.1)
    r = ar(repo, "run", "-m", "worse, again", "--rerun", "--confirm", "0")
    assert r.returncode == 0 and "seed 43" in r.stdout  # a new seed, not the same run again
    first, again = runs(repo)[-2:]
    assert again["seed"] == 43 and again["seeds_used"] == 2
    assert again["val_bpb_mean"] == pytest.approx(statistics.fmean([first["val_bpb"], again["val_bpb"]]))
    assert "mean of 2 runs" in again["reason"]


def test_rerun_of_the_best_measures_it_again(repo):
    from autoresearch import plot

    edit(repo, NOISE=0.05)
    git(repo, "commit", "-qam", "noisy fixture")
    head = baseline(repo)
    r = ar(repo, "run", "-m", "baseline again", "--rerun")
    assert r.returncode == 0 and "verdict:      remeasure" in r.stdout and "measured again" in r.stdout, r.stdout
    assert "nothing changed in git" in r.stdout and git(repo, "rev-parse", "HEAD") == head
    values = [x["val_bpb"] for x in runs(repo)]
    status = ar(repo, "status").stdout
    assert f"best:            {statistics.fmean(values):.6f} (mean of 2 runs)" in status
    assert "keep rate:       -" in status  # a measurement, not an idea
    # one experiment everywhere: status, results.tsv (one row, the pooled mean), the plot, the ledger
    assert "experiments:     1 = 1 kept (baseline included)" in status and "remeasured:      1 rerun" in status
    assert [row[1] for row in results(repo)[1:]] == [f"{statistics.fmean(values):.6f}"]
    assert len(plot.series(ledger(repo))["kept"]) == 1 and len(gate.experiments(ledger(repo))) == 1


def simpler_commit_that_drifts(repo, bpb, noise, margin=gate.DEFAULT_MARGIN):
    """Edit train.py into a 'simplification' whose seed-42 run is within the bar of a 1.0 baseline but whose mean
    with seed 43 is worse than it by more than the bar for 2 runs against 1 (the fixture's draws are fixed)."""
    from test_harness import fixture_value
    for k in range(500):
        text = edit(repo, BPB=bpb, NOISE=noise, append=f"# simpler {k}\n")
        first, second = fixture_value(text, 42), fixture_value(text, 43)
        if first - 1.0 < 0.8 * margin and (first + second) / 2 - 1.0 > 1.2 * gate.bar(margin, 2, 1):
            return first, second
        git(repo, "checkout", "train.py")
    raise AssertionError("no draw found")


def test_rerun_of_a_kept_simplification_that_drifted_worse_says_how_to_go_back(repo):
    from autoresearch import plot

    base = baseline(repo)  # NOISE 0: exactly 1.0
    first, second = simpler_commit_that_drifts(repo, bpb=1.003, noise=0.004)
    r = ar(repo, "run", "-m", "simpler", "--simpler")
    assert "verdict:      keep" in r.stdout, r.stdout
    simpler, text = git(repo, "rev-parse", "HEAD"), read(repo)
    r = ar(repo, "run", "-m", "simpler again", "--rerun")
    assert r.returncode == 0 and "verdict:      remeasure" in r.stdout, r.stdout
    assert "NO LONGER clears the bar it was kept on" in r.stdout
    assert f"go back:      {base[:7]} is better" in r.stdout and f"git reset --hard {base[:7]}" in r.stdout
    assert git(repo, "rev-parse", "HEAD") == simpler and read(repo) == text  # nothing changed in git
    rec = runs(repo)[-1]
    assert rec["remeasure"] and rec["commit"] == simpler and rec["fails_bar"]["better_commit"] == base
    assert rec["val_bpb_mean"] == pytest.approx((first + second) / 2)
    # results.tsv: one row per kept commit, the pooled mean; status and the plot count the same
    rows = results(repo)[1:]
    assert [row[3] for row in rows] == ["keep", "keep"] and rows[1][1] == f"{(first + second) / 2:.6f}"
    status = ar(repo, "status").stdout
    assert "experiments:     2 = 2 kept (baseline included) + 0 discarded" in status and "keep rate:       100%" in status
    assert f"no longer clears the bar it was kept on ({base[:7]} is better" in status
    assert f"git reset --hard {base[:7]}" in status and f"best:            1.000000 (mean of 1 run)  {base[:7]}" in status
    assert f"branch stands on: {(first + second) / 2:.6f} (mean of 2 runs)  {simpler[:7]}" in status  # the base
    assert len(plot.series(ledger(repo))["kept"]) == 2
    git(repo, "reset", "--hard", base)  # the printed command: the branch is back on the baseline, no warning
    assert "no longer clears" not in ar(repo, "status").stdout


def test_rerun_of_a_commit_kept_with_its_own_margin_is_judged_by_that_margin(repo):
    baseline(repo)  # NOISE 0: exactly 1.0, so every rerun gives the same value
    small = gate.DEFAULT_MARGIN / 10
    edit(repo, BPB=1.0 - 2 * small)  # clears a bar of `small`, far inside the default margin
    r = ar(repo, "run", "-m", "better by a little", "--margin", str(small), "--confirm", "0")
    assert "verdict:      keep" in r.stdout, r.stdout
    r = ar(repo, "run", "-m", "again", "--rerun")  # no --margin: the default would say it no longer clears
    assert "verdict:      remeasure" in r.stdout and "still clears the bar it was kept on" in r.stdout, r.stdout
    assert "go back" not in r.stdout


def test_rerun_of_a_kept_commit_that_is_not_the_best_is_not_judged_as_a_new_idea(repo):
    baseline(repo)
    edit(repo, BPB=1.003, append="# simpler\n")  # kept, slightly worse than the best
    assert "verdict:      keep" in ar(repo, "run", "-m", "simpler", "--simpler").stdout
    simpler = git(repo, "rev-parse", "HEAD")
    r = ar(repo, "run", "-m", "simpler again", "--rerun")
    assert "verdict:      remeasure" in r.stdout and "still clears the bar it was kept on" in r.stdout, r.stdout
    assert "go back" not in r.stdout and git(repo, "rev-parse", "HEAD") == simpler  # never discarded, never reverted
    assert [row[3] for row in results(repo)[1:]] == ["keep", "keep"]


def test_recheck_uses_the_rule_the_commit_was_kept_on():
    m, earlier = 0.01, [("base", 1.0, 4), ("worse", 1.02, 1)]  # against the best of the earlier kept commits
    b = gate.bar(m, 2, 4)
    assert gate.recheck(1.0 + 0.9 * b, 2, earlier, m, simpler=True)[0]
    assert gate.recheck(1.0 + 1.1 * b, 2, earlier, m, simpler=True) == (False, gate.judge(1.0 + 1.1 * b, 1.0, m, True, 2, 4)[1], "base")
    assert gate.recheck(1.0 - 1.1 * b, 2, earlier, m)[0]      # a pooled mean needs the bar, not twice it
    assert not gate.recheck(1.0 - 0.9 * b, 2, earlier, m)[0]
    assert gate.recheck(5.0, 2, [], m)[0]                     # the baseline: kept without a bar


def test_the_plot_draws_the_bar_a_single_run_must_beat(repo):
    from autoresearch import plot

    baseline(repo)
    assert ar(repo, "noise", "-n", "3").returncode == 0  # the best is a mean of 4 runs
    edit(repo, BPB=1.5)
    ar(repo, "run", "-m", "worse", "--margin", "0.02")
    recs = ledger(repo)
    s = plot.series(recs, margin=0.02)
    assert runs(repo)[-1]["best_runs"] == 4
    assert s["bars"][-1] == pytest.approx(gate.bar(0.02, 1, 4)) and s["bars"][-1] < 0.02  # not the margin
    assert s["next_bar"] == pytest.approx(gate.bar(0.02, 1, 4)) and s["next_best_runs"] == 4
    assert os.path.exists(plot.make_plot(recs, os.path.join(repo, "p.png"), margin=0.02))


def test_a_keep_that_a_reset_took_out_of_the_history_is_left_in_status_and_the_plot(repo):
    from autoresearch import gitops, plot

    base = baseline(repo)
    edit(repo, BPB=0.5)
    r = ar(repo, "run", "-m", "better")
    assert "verdict:      keep" in r.stdout, r.stdout
    kept = git(repo, "rev-parse", "HEAD")
    git(repo, "reset", "-q", "--hard", base)  # as a "go back:" line tells the agent to
    s = plot.series(ledger(repo), margin=0.02, in_history=lambda c: gitops.is_ancestor(repo, c, "HEAD"))
    assert [r["commit"] for _, _, r in s["kept"]] == [base] and s["left"] == [(2, 0.5)] and not s["discarded"]
    status = ar(repo, "status").stdout  # the same: still a keep (as in results.tsv), no longer the best
    assert re.search(r"^best: +1\.000000", status, re.M)
    assert "2 = 2 kept (baseline included; 1 since left by a git reset) + 0 discarded" in status, status
    assert [row[3] for row in results(repo)[1:]] == ["keep", "keep"]
    assert ar(repo, "plot").returncode == 0 and kept != base


def test_after_a_simpler_keep_the_reference_is_its_pooled_mean(repo):
    edit(repo, NOISE=0.002)
    git(repo, "commit", "-qam", "noisy fixture")
    baseline(repo)
    edit(repo, BPB=1.01, append="# simpler\n")
    r = ar(repo, "run", "-m", "simpler", "--simpler", "--margin", "0.05")
    assert "verdict:      keep" in r.stdout, r.stdout
    assert ar(repo, "noise", "-n", "3").returncode == 0  # three more runs of the simpler train.py
    recs = ledger(repo)
    simpler = runs(repo)[-1]
    pooled = gate.pool(recs, simpler["content_hash"])
    assert len(pooled) == 4
    best_rec, best = gate.best_kept(recs)
    base_value = runs(repo)[0]["val_bpb"]
    assert best == pytest.approx(min(statistics.fmean(pooled), base_value))
    row = results(repo)[2]
    assert row[1] == f"{statistics.fmean(pooled):.6f}" and "[mean of 4 runs]" in row[4]  # results.tsv agrees


# ---------------------------------------------------------------------------
# item 7: one set of numbers

def test_status_results_and_plot_agree(repo):
    from autoresearch import plot

    edit(repo, NOISE=0.01)
    git(repo, "commit", "-qam", "noisy fixture")
    baseline(repo)
    assert ar(repo, "noise", "-n", "2").returncode == 0
    edit(repo, BPB=0.8)
    ar(repo, "run", "-m", "better")
    edit(repo, BPB=0.95)
    ar(repo, "run", "-m", "worse")
    edit(repo, MODE="crash")
    ar(repo, "run", "-m", "broken")
    edit(repo, MODE="hang", BPB=0.7)
    proc = ar_start(repo, "run", "-m", "interrupted")
    log = os.path.join(repo, "run.log")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (os.path.exists(log) and "hanging" in open(log).read()):
        time.sleep(0.05)
    proc.terminate()
    proc.communicate(timeout=30)
    edit(repo, MODE="good", BPB=0.9, append="# after\n")
    ar(repo, "run", "-m", "not better")

    out = ar(repo, "status").stdout
    recs = ledger(repo)
    exps = runs(repo)
    assert "experiments:     6 = 2 kept (baseline included) + 2 discarded + 1 crashed + 1 interrupted" in out
    base_pool = gate.pool(recs, exps[0]["content_hash"])
    assert len(base_pool) == 3
    assert f"baseline:        {statistics.fmean(base_pool):.6f} (mean of 3 runs)" in out
    best = gate.best_kept(recs)[1]
    assert f"best is {statistics.fmean(base_pool) - best:.4f} below the baseline (val_bpb: lower is better)" in out
    rows = results(repo)[1:]
    assert [row[3] for row in rows] == [r["verdict"] for r in exps]
    assert rows[0][1] == f"{statistics.fmean(base_pool):.6f}" and "[mean of 3 runs]" in rows[0][4]
    for r, row in zip(exps, rows):  # status lists the same numbers under the same experiment numbers
        if r["verdict"] in ("keep", "discard"):
            assert f"  {r['exp']:>4}  {r['commit'][:7]:7}  {row[1]:>9}" in out
    s = plot.series(recs)
    assert [x for x, _, _ in s["kept"]] == [1, 2] and [x for x, _ in s["discarded"]] == [3, 6] and s["crash"] == [4]
    assert [f"{v:.6f}" for _, v, _ in s["kept"]] == [rows[0][1], rows[1][1]]
    assert s["margins"][0] == gate.DEFAULT_MARGIN and s["margins"][1] == pytest.approx(exps[1]["margin"])
    assert s["margins"][1] != gate.DEFAULT_MARGIN  # measured by noise after the baseline


# ---------------------------------------------------------------------------
# item 8: an edit made during a run is never overwritten

@pytest.mark.parametrize("how", ["discard", "timeout"])
def test_edit_made_during_a_run_survives_its_revert(repo, how):
    base = baseline(repo, "--budget", "1")
    if how == "discard":
        edit(repo, BPB=1.5, SLEEP=1.5)
    else:
        edit(repo, MODE="hang")
    log = os.path.join(repo, "run.log")
    os.remove(log)  # the baseline's: wait for this run's
    proc = ar_start(repo, "run", "-m", "slow idea", "--budget", "1", "--timeout", "6")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (os.path.exists(log) and "Startup" in open(log).read()):
        time.sleep(0.05)
    newer = edit(repo, MODE="good", BPB=0.7, SLEEP=0.0, append="# the next idea, written while the run goes\n")
    out, _ = proc.communicate(timeout=60)
    assert ("verdict:      discard" if how == "discard" else "timed out") in out, out
    assert "edited during the run" in out
    assert git(repo, "rev-parse", "HEAD") == base                        # the branch went back...
    assert read(repo) == newer                                           # ...but the newer file stayed
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == "M train.py"
    r = ar(repo, "run", "-m", "the next idea", "--budget", "1")
    assert r.returncode == 0 and "verdict:      keep" in r.stdout


# ---------------------------------------------------------------------------
# item 10: every setting checked first

@pytest.mark.parametrize("args,env", [
    (["--budget", "nan"], {}), (["--budget", "inf"], {}), (["--budget", "-5"], {}), (["--budget", "abc"], {}),
    (["--timeout", "inf"], {}), (["--timeout", "nan"], {}), (["--timeout", "100"], {}),  # shorter than the budget
    (["--margin", "nan"], {}), (["--margin", "-0.1"], {}), (["--confirm", "-1"], {}), (["--seed", "-3"], {}),
    ([], {"AUTORESEARCH_TIME_BUDGET": "abc"}), ([], {"AUTORESEARCH_TIME_BUDGET": "nan"}),
    ([], {"AUTORESEARCH_TIMEOUT": "inf"}), ([], {"AUTORESEARCH_EVAL_TOKENS": "12.5"}),
])
def test_bad_settings_are_refused_before_anything_changes(repo, args, env):
    baseline(repo)
    text = edit(repo, BPB=0.5)
    head = git(repo, "rev-parse", "HEAD")
    r = ar(repo, "run", "-m", "idea", *args, env=env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    unchanged(repo, head, text, 1)


def test_bad_settings_for_noise_and_status(repo):
    baseline(repo)
    for args, env in ((["-n", "0"], {}), ([], {"AUTORESEARCH_TIMEOUT": "nan"})):
        r = ar(repo, "noise", *args, env=env)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert len(ledger(repo)) == 1
    r = ar(repo, "status", env={"AUTORESEARCH_TIME_BUDGET": "abc", "AUTORESEARCH_TIMEOUT": "nan"})
    assert r.returncode == 0 and "Traceback" not in r.stderr and "best:" in r.stdout


def test_the_clock_rules():
    class Channel:  # what train.py sent, stamped with the harness's clock (seconds since its start)
        def __init__(self, clock, steps, done):
            self.clock, self.hand_over = clock, (done, {})
            self.steps = [(t, i, 3.0, 1000 * i) for i, t in enumerate(steps)]

    honest = Channel(3.0, [1.0, 2.0] + [3.0 + 0.5 * k for k in range(1, 21)], 13.4)
    assert runner.judge_clock(honest, 10, 0, 0) is None
    slow = Channel(3.0, [1.0, 2.0, 9.0, 15.0], 19.0)  # 6-second steps (a loaded CPU): one step and more past it
    assert runner.judge_clock(slow, 10, 0, 0) is None
    late = Channel(40.0, [1.0, 2.0, 41.0, 42.0, 43.0], 50.0)  # 37 s of work before the clock
    assert "before its training clock started" in runner.judge_clock(late, 10, 0, 0)
    credit = runner.KERNEL_CREDIT["cuda" if runner.hardware().get("gpu") else "other"]
    assert runner.judge_clock(late, 10, math.ceil(30 / credit), 0) is None  # kernels compiled: their time
    assert runner.judge_clock(late, 10, 0, 0, startup_reference=25.0) is None  # the baseline took 25 s
    long = Channel(3.0, [1.0, 2.0] + [3.0 + 0.5 * k for k in range(1, 41)], 23.5)  # twice the budget
    assert "past the 10 s budget" in runner.judge_clock(long, 10, 0, 0)
    assert runner.judge_clock(long, 10, 0, 11 * runner.EXPORT_BYTES_PER_SECOND) is None  # an 11 GB export
    sparse = Channel(3.0, [1.0, 2.0, 16.0, 29.0, 42.0], 43.0)  # three reports 13 s apart: the steps' grace is capped
    assert "past the 10 s budget" in runner.judge_clock(sparse, 10, 0, 0)
    early = Channel(3.0, [0.5, 1.0, 1.5, 2.0] + [3.5], 4.0)
    assert "trained 4 steps before its clock" in runner.judge_clock(early, 10, 0, 0)
    none = Channel(None, [1.0], 4.0)
    assert "never started its training clock" in runner.judge_clock(none, 10, 0, 0)


def test_the_already_run_refusal_quotes_the_pooled_mean(repo):
    edit(repo, NOISE=0.002)
    git(repo, "commit", "-qam", "noisy fixture")
    baseline(repo)
    assert ar(repo, "noise", "-n", "2").returncode == 0
    first = runs(repo)[0]
    mean = gate.shown_value(ledger(repo), first)
    assert round(mean, 6) != round(first["val_bpb"], 6)
    r = ar(repo, "run", "-m", "same again")
    assert r.returncode == 2 and f"val_bpb {mean:.6f}" in r.stderr, r.stderr  # as results.tsv and status show it
