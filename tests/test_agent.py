"""
`autoresearch agent` end to end, offline: a scripted OpenAI-compatible server on 127.0.0.1 (scripted_openai.py)
drives real loops over the fixture train.py in throwaway repositories, through the real harness. Plus the edit
parser, the request's size after 100 experiments, and `run --detach` / `wait`.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from scripted_openai import ScriptedServer
from test_harness import ROOT, ar, edit, git, harness_env, ledger, read, repo, results  # noqa: F401 (repo: fixture)

pytest.importorskip("openai", reason="the agent needs the OpenAI client: uv sync --extra agent")

from autoresearch import agent, context, edits  # noqa: E402


def reply(description, old, new, note=None):
    return (f"I will try this.\nDESCRIPTION: {description}\n" + (f"NOTE: {note}\n" if note else "")
            + f"```python\n<<<<<<< SEARCH\n{old}\n=======\n{new}\n>>>>>>> REPLACE\n```\n")


@pytest.fixture
def arepo(repo):
    """The harness tests' repository plus the real program.md (whose rules go into every request)."""
    shutil.copy(os.path.join(ROOT, "program.md"), os.path.join(repo, "program.md"))
    git(repo, "add", "program.md")
    git(repo, "commit", "-q", "-m", "program.md")
    return repo


def agent_env(**extra):
    return {**harness_env(), "AUTORESEARCH_AGENT_BACKOFF": "0.2", "OPENAI_API_KEY": "test-key", **extra}


def agent_cmd(server, *args):
    return [sys.executable, "-m", "autoresearch", "agent", "--base-url", server.url, "--model", "scripted",
            "--noise-runs", "0", *args]


def run_agent(repo, server, *args, timeout=120):
    return subprocess.run(agent_cmd(server, *args), cwd=repo, capture_output=True, text=True, env=agent_env(),
                          timeout=timeout)


def agent_log(repo):
    with open(os.path.join(repo, ".autoresearch", "agent.jsonl")) as f:
        return [json.loads(line) for line in f]


def runs(repo):
    return [r for r in ledger(repo) if r["kind"] == "run"]


def state(repo):
    with open(os.path.join(repo, ".autoresearch", "agent.json")) as f:
        return json.load(f)


def until(condition, timeout=60, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------------------
# the loop

@pytest.mark.slow
def test_loop_applies_good_edits_and_sends_bad_ones_back(arepo):
    script = [
        reply("lower BPB", "BPB = 1.0", "BPB = 0.9", note="BPB matters a lot"),      # #2 keep
        reply("typo in search", "BPB = 0.85", "BPB = 0.8"),                         # not in train.py: sent back
        "I think we should lower the learning rate.",                               # no block: sent back
        reply("slightly worse", "BPB = 0.9", "BPB = 0.95"),                         # #3 discard
        reply("broken syntax", "BPB = 0.9", "BPB = (0.8"),                          # does not compile: sent back
        "DESCRIPTION: touch prepare.py\nprepare.py\n<<<<<<< SEARCH\nx = 1\n=======\nx = 2\n>>>>>>> REPLACE\n",
        reply("crash it", 'MODE = "good"', 'MODE = "crash"'),                      # #4 crash
    ]
    with ScriptedServer(script) as server:
        r = run_agent(arepo, server, "--max-experiments", "3")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "3 experiments done" in out
    rows = runs(arepo)
    assert [(x["description"], x["verdict"]) for x in rows] == [
        ("baseline", "keep"), ("lower BPB", "keep"), ("slightly worse", "discard"), ("crash it", "crash")]
    assert len(results(arepo)) == 5  # header + 4, written by the same path as `autoresearch run`
    # train.py is the kept version: the discard and the crash were reverted by the harness
    assert "BPB = 0.9\n" in read(arepo) and 'MODE = "good"' in read(arepo)
    assert git(arepo, "status", "--porcelain", "--untracked-files=no") == ""

    # every reply cost one request; the rejected ones came back with their reason and cost no experiment
    assert len(server.requests) == 7
    assert "SEARCH text is not in the current train.py" in server.last_user_message(2)
    assert "no SEARCH/REPLACE block" in server.last_user_message(3)
    assert "does not compile" in server.last_user_message(5)
    assert "only train.py may be changed" in server.last_user_message(6)
    # each request is rebuilt from disk: rules from program.md, the current train.py, the verdicts so far
    first, later = server.requests[0]["body"]["messages"], server.requests[6]["body"]["messages"]
    assert "You **may not**" in first[0]["content"] and "BPB = 1.0" in first[1]["content"]
    assert "#3 discard" in later[1]["content"] and "#2 keep" in later[1]["content"]
    assert "BPB matters a lot" in later[1]["content"]  # the NOTE: line came back
    assert "num_steps 3" in later[1]["content"]  # the best run's summary block
    # a fresh request per experiment, plus only the last rejected reply and its reason: never a transcript
    assert len(server.requests[4]["body"]["messages"]) == 2 and len(later) == 4

    log = agent_log(arepo)
    exchanges = [e for e in log if e["event"] == "exchange"]
    assert [e["applied"] for e in exchanges] == [True, False, False, True, False, False, True]
    assert all(e["usage"]["total_tokens"] > 0 and e["request_chars"] > 0 for e in exchanges)
    assert [e["verdict"] for e in log if e["event"] == "verdict"] == ["keep", "keep", "discard", "crash"]
    assert "BPB matters a lot" in read(arepo, ".autoresearch/notes.md")

    s = ar(arepo, "status")
    assert "agent:" in s.stdout and "stopped" in s.stdout and "3 experiments" in s.stdout


@pytest.mark.slow
def test_api_errors_timeouts_and_rate_limits_are_retried(arepo):
    script = [
        {"status": 500},
        {"status": 429, "headers": {"Retry-After": "1"}},
        {"sleep": 3, "then": "too late"},  # the client gives up after --request-timeout 1
        reply("lower BPB", "BPB = 1.0", "BPB = 0.9"),
    ]
    with ScriptedServer(script) as server:
        r = run_agent(arepo, server, "--max-experiments", "1", "--request-timeout", "1")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert [x["verdict"] for x in runs(arepo)] == ["keep", "keep"]
    errors = [e for e in agent_log(arepo) if e["event"] == "api_error"]
    assert [e["error"] for e in errors] == ["HTTP 500", "HTTP 429", "no reply within 1 s"]
    assert errors[1]["retry_after"] == 1.0
    t = [q["time"] for q in server.requests]
    assert t[2] - t[1] >= 1.0  # Retry-After honoured
    assert "retry 1/8" in out


def test_fatal_api_error_stops_at_once_with_a_clear_reason(arepo):
    with ScriptedServer([{"status": 401, "message": "bad key"}]) as server:
        r = run_agent(arepo, server, "--noise-runs", "0")
    # the baseline ran (no model needed), then a 401 is not retried
    assert r.returncode == 2 and "HTTP 401" in r.stdout and "OPENAI_API_KEY" in r.stdout
    assert len(server.requests) == 1
    assert state(arepo)["status"] == "stopped"


@pytest.mark.slow
def test_consecutive_crashes_ask_for_something_different_then_stop(arepo):
    script = [reply("crash one", 'MODE = "good"', 'MODE = "crash"'),
              reply("crash two", 'MODE = "good"', 'MODE = "nosummary"')]
    with ScriptedServer(script) as server:
        r = run_agent(arepo, server, "--max-crashes", "1")
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "2 crashes in a row" in out, out
    second = server.last_user_message(1)
    assert "propose something different" in second
    assert "fixture crash" in second  # the tail of the last crash's log
    assert 'MODE = "good"' in read(arepo)  # back at the best train.py
    assert len(server.requests) == 2


@pytest.mark.slow
def test_ctrl_c_mid_run_loses_nothing_and_the_next_start_resumes(arepo):
    line = 'SLEEP = 0.0     # seconds of "training" before the summary (mode good)'
    script = [reply("slow but better", line, "SLEEP = 3.0\nBPB = 0.9")]
    with ScriptedServer(script) as server:
        proc = subprocess.Popen(agent_cmd(server), cwd=arepo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=agent_env())
        until(lambda: os.path.exists(os.path.join(arepo, ".autoresearch", "agent.json"))
              and "running experiment #2" in (state(arepo).get("doing") or ""), what="experiment #2 to start")
        status = ar(arepo, "status").stdout
        assert "agent:           running, pid" in status and "running experiment #2: slow but better" in status
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
        assert proc.returncode == 130, out
        assert runs(arepo)[-1]["verdict"] == "interrupted"
        assert "SLEEP = 3.0\nBPB = 0.9" in read(arepo)  # the edit is kept in train.py, uncommitted
        assert git(arepo, "status", "--porcelain", "--untracked-files=no") == "M train.py"
        assert state(arepo)["pending"]["description"] == "slow but better"
        assert "stopped" in ar(arepo, "status").stdout

        # run again: it re-runs the interrupted edit first, without asking the model
        r = run_agent(arepo, server, "--max-experiments", "1")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "resuming the interrupted experiment 'slow but better'" in out
    assert [(x["description"], x["verdict"]) for x in runs(arepo)] == [
        ("baseline", "keep"), ("slow but better", "interrupted"), ("slow but better", "keep")]
    assert len(server.requests) == 1
    assert state(arepo)["pending"] is None


@pytest.mark.slow
def test_token_and_cost_caps(arepo):
    script = [reply("lower BPB", "BPB = 1.0", "BPB = 0.9"), reply("lower BPB more", "BPB = 0.9", "BPB = 0.8")]
    with ScriptedServer(script) as server:
        r = run_agent(arepo, server, "--max-tokens", "100")  # the scripted server counts ~characters/4
    assert r.returncode == 0 and "token cap reached" in r.stdout, r.stdout + r.stderr
    assert len(server.requests) == 1 and [x["verdict"] for x in runs(arepo)] == ["keep", "keep"]
    with ScriptedServer(script[1:]) as server:
        r = run_agent(arepo, server, "--max-cost", "0.001", "--price", "1000", "1000")
    assert r.returncode == 0 and "cost cap reached" in r.stdout, r.stdout + r.stderr
    assert len(server.requests) == 1 and state(arepo)["session"]["cost"] > 0.001
    assert [x["description"] for x in runs(arepo)][-1] == "lower BPB more"  # its one reply ran, then the cap
    with ScriptedServer(script[1:]) as server:  # a cost cap needs a cost: stop before running anything
        r = run_agent(arepo, server, "--max-cost", "5")
    assert r.returncode == 2 and "--price" in r.stdout and len(runs(arepo)) == 3, r.stdout + r.stderr


def test_ctrl_c_while_asking_the_model(arepo):
    with ScriptedServer([{"sleep": 30, "then": "late"}]) as server:
        proc = subprocess.Popen(agent_cmd(server), cwd=arepo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=agent_env())
        until(lambda: len(server.requests) == 1, what="the first request")
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 130 and "nothing was lost" in out, out
    assert git(arepo, "status", "--porcelain", "--untracked-files=no") == ""
    assert [x["verdict"] for x in runs(arepo)] == ["keep"]


@pytest.mark.slow
def test_tool_call_replies_work_too(arepo):
    tool = {"description": "lower BPB by tool", "edits": [{"search": "BPB = 1.0", "replace": "BPB = 0.8"}],
            "notes": ["tools work"]}
    with ScriptedServer([{"tool": tool}]) as server:
        r = run_agent(arepo, server, "--max-experiments", "1", "--tools")
    assert r.returncode == 0, r.stdout + r.stderr
    assert server.requests[0]["body"]["tools"][0]["function"]["name"] == "propose_edit"
    assert runs(arepo)[-1]["description"] == "lower BPB by tool" and runs(arepo)[-1]["verdict"] == "keep"


def test_refuses_foreign_edits_and_missing_settings(arepo):
    edit(arepo, BPB=0.7)
    with ScriptedServer([]) as server:
        r = run_agent(arepo, server)
    assert r.returncode == 2 and "edits the agent did not make" in r.stdout
    assert "BPB = 0.7" in read(arepo)  # left alone
    r = subprocess.run([sys.executable, "-m", "autoresearch", "agent", "--model", "m"], cwd=arepo,
                       capture_output=True, text=True, env={**agent_env(), "OPENAI_BASE_URL": ""})
    assert r.returncode == 2 and "--base-url" in r.stderr


def test_run_settings_are_checked_like_run_before_the_model_is_asked(arepo):
    assert ar(arepo, "run", "-m", "baseline", "--budget", "30").returncode == 0
    with ScriptedServer([reply("lower BPB", "BPB = 1.0", "BPB = 0.9")]) as server:
        other_budget = run_agent(arepo, server, "--budget", "20")
        short_timeout = subprocess.run(agent_cmd(server, "--budget", "30"), cwd=arepo, capture_output=True,
                                       text=True, env=agent_env(AUTORESEARCH_TIMEOUT="10"), timeout=60)
        bad_flag = run_agent(arepo, server, "--max-experiments", "0")
    assert other_budget.returncode == 2 and "not be comparable" in other_budget.stderr, other_budget.stderr
    assert "budget 20" in other_budget.stderr and "git checkout -b" in other_budget.stderr
    assert short_timeout.returncode == 2 and "must be longer than the training budget" in short_timeout.stderr
    assert bad_flag.returncode == 2 and "--max-experiments: must be a whole number > 0" in bad_flag.stderr
    assert server.requests == [] and [x["description"] for x in runs(arepo)] == ["baseline"]
    assert git(arepo, "status", "--porcelain", "--untracked-files=no") == ""


# ---------------------------------------------------------------------------
# pieces

def test_parse_and_apply():
    text = "a = 1\nb = 2\nc = 3\n"
    p = edits.parse("DESCRIPTION: two edits\nNOTE: keep c\ntrain.py\n<<<<<<< SEARCH\na = 1\n=======\na = 5\n"
                    ">>>>>>> REPLACE\n\n<<<<<<< SEARCH\nc = 3   \n=======\n>>>>>>> REPLACE\n")
    assert p.description == "two edits" and p.notes == ["keep c"]
    assert edits.apply(text, p.blocks) == "a = 5\nb = 2\n"  # trailing spaces forgiven; deleting works
    with pytest.raises(edits.EditError, match="appears 2 times"):
        edits.apply("x = 1\nx = 1\n", [("x = 1\n", "x = 2\n")])
    with pytest.raises(edits.EditError, match="closest line in train.py is line 2"):
        edits.apply(text, [("b = 22\n", "b = 3\n")])
    draft = "<think>maybe\nDESCRIPTION: draft\n<<<<<<< SEARCH\nb = 2\n=======\nb = 9\n>>>>>>> REPLACE\n</think>\n"
    p = edits.parse(draft + "DESCRIPTION: final\n<<<<<<< SEARCH\na = 1\n=======\na = 7\n>>>>>>> REPLACE\n")
    assert p.description == "final" and p.blocks == [("a = 1\n", "a = 7\n")]  # the thinking's draft is ignored
    with pytest.raises(edits.EditError, match="not closed"):
        edits.parse("DESCRIPTION: x\n<<<<<<< SEARCH\na\n=======\nb\n")
    with pytest.raises(edits.EditError, match="DESCRIPTION"):
        edits.parse("<<<<<<< SEARCH\na\n=======\nb\n>>>>>>> REPLACE\n")
    with pytest.raises(edits.EditError, match="only train.py"):
        edits.parse("DESCRIPTION: x\n```python\n# src/prepare.py\n```\n<<<<<<< SEARCH\na\n=======\nb\n>>>>>>> REPLACE")
    with pytest.raises(edits.EditError, match="only train.py"):
        edits.from_tool_call({"description": "x", "edits": [{"file": "prepare.py", "search": "a", "replace": "b"}]})


def test_request_size_stays_flat_over_100_experiments(tmp_path, capsys):
    """Simulate a branch's ledger of 200 experiments (real train.py and program.md) and measure the request."""
    from autoresearch import ledger as ledger_mod
    root = str(tmp_path)
    for name in ("train.py", "program.md"):
        shutil.copy(os.path.join(ROOT, name), root)
    branch, sizes = "autoresearch/sim", {}
    best = 1.0
    for n in range(1, 201):
        verdict = "keep" if n == 1 or n % 7 == 0 else ("crash" if n % 10 == 9 else "discard")
        val = best - 0.001 if verdict == "keep" else best + 0.002 * (n % 5)
        rec = {"kind": "run", "branch": branch, "exp": n, "commit": f"{n:040x}", "content_hash": f"{n:016x}",
               "description": f"experiment {n}: " + "a fairly long description of the idea " * 3,
               "verdict": verdict, "val_bpb": val if verdict != "crash" else None, "best_before": best,
               "reason": "...", "seed": 42,
               "metrics": {"val_bpb": val, "training_seconds": 300.1, "total_seconds": 325.9, "peak_vram_mb": 45060.2,
                           "mfu_percent": 39.8, "total_tokens_M": 499.6, "num_steps": 953, "num_params_M": 50.3,
                           "depth": 8}}
        best = val if verdict == "keep" else best
        ledger_mod.append_record(root, rec)
        ledger_mod.append_line(os.path.join(root, ".autoresearch", "notes.md"), f"- #{n}: idea number {n} " * 4)
        if n in (10, 30, 100, 200):
            crash = {"exp": n - 1, "description": "x", "reason": "train.py failed", "tail": "Traceback ...\n" * 200}
            messages = context.build(root, branch, crash, in_history=lambda c: True)
            sizes[n] = context.size(messages)
            assert "## Kept changes" in messages[1]["content"] and "num_steps 953" in messages[1]["content"]
    train_chars = os.path.getsize(os.path.join(root, "train.py"))
    with capsys.disabled():
        print(f"\nrequest size: {sizes} characters (train.py is {train_chars})")
    # everything but train.py (rules, results, notes, crash tail) is capped; train.py itself is the model's work
    assert sizes[100] - train_chars < 17_000
    assert abs(sizes[200] - sizes[100]) < 200  # flat: every part is capped, only numbers get longer


# ---------------------------------------------------------------------------
# run --detach / wait: no command has to block for a whole run

@pytest.mark.slow
def test_run_detach_then_wait(arepo):
    ar(arepo, "run", "-m", "baseline")
    edit(arepo, SLEEP=8.0, BPB=0.9)
    t0 = time.monotonic()
    r = ar(arepo, "run", "--detach", "-m", "slow better")
    assert r.returncode == 0 and "started in the background" in r.stdout, r.stdout + r.stderr
    assert time.monotonic() - t0 < 10
    r = ar(arepo, "run", "--detach", "-m", "second")
    assert r.returncode == 2 and "still running" in r.stderr
    r = ar(arepo, "wait", "--timeout", "0.2")
    assert r.returncode == 0 and "still running" in r.stdout
    r = ar(arepo, "wait")
    assert r.returncode == 0 and "verdict:      keep" in r.stdout, r.stdout + r.stderr
    assert runs(arepo)[-1]["description"] == "slow better"
    r = ar(arepo, "wait")  # printed once only
    assert r.returncode == 0 and "nothing to wait for" in r.stdout and "verdict:" not in r.stdout


@pytest.mark.slow
def test_detach_reports_a_refusal_at_once_and_stop_interrupts(arepo):
    ar(arepo, "run", "-m", "baseline")
    r = ar(arepo, "run", "--detach", "-m", "same again")  # identical train.py: refused by the background run
    assert r.returncode == 2 and "already run" in r.stdout
    edit(arepo, SLEEP=20.0)
    assert ar(arepo, "run", "--detach", "-m", "long").returncode == 0
    until(lambda: os.path.exists(os.path.join(arepo, "run.log")) and "step" in read(arepo, "run.log"),
          what="the detached run to start training")
    r = ar(arepo, "stop")
    assert r.returncode == 0 and "interrupted the detached" in r.stdout
    r = ar(arepo, "wait")
    assert r.returncode == 130 and "verdict:      interrupted" in r.stdout
    assert "SLEEP = 20.0" in read(arepo)  # the edit is left in place, as after Ctrl-C


# ---------------------------------------------------------------------------
# parallel mode: the agent keeps every worker of a local Ray cluster busy through submit/wait

@pytest.mark.slow
def test_parallel_mode_keeps_both_workers_busy(arepo):
    ray = pytest.importorskip("ray", reason="parallel mode needs Ray: uv sync --extra parallel")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    env = agent_env(AUTORESEARCH_RAY_ADDRESS=ray.get_runtime_context().gcs_address, AUTORESEARCH_IDLE="30")
    slow = 'SLEEP = 0.0     # seconds of "training" before the summary (mode good)'
    script = [reply("better, slowest", slow, "SLEEP = 8.0\nBPB = 0.9"),
              reply("worse, slow", slow, "SLEEP = 1.0\nBPB = 1.1"),
              reply("best", "BPB = 1.0", "BPB = 0.8")]
    try:
        with ScriptedServer(script) as server:
            r = subprocess.run(agent_cmd(server, "--workers", "2", "--max-experiments", "3"), cwd=arepo,
                               capture_output=True, text=True, env=env, timeout=300)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out
        verdicts = {x["description"]: x["verdict"] for x in runs(arepo)}
        assert verdicts["baseline"] == "keep" and verdicts["worse, slow"] == "discard" and verdicts["best"] == "keep"
        assert len(verdicts) == 4
        # the second idea was asked for while the first one ran, the third as soon as the second's verdict came
        # while the first still ran: both workers always busy, and the model knew what was running
        assert "- better, slowest" in server.last_user_message(1)
        assert "- better, slowest" in server.last_user_message(2) and "worse, slow" in server.last_user_message(2)
        assert {x.get("worker") for x in runs(arepo)[1:]} == {0, 1}
        assert "3 experiments done" in out
    finally:
        subprocess.run([sys.executable, "-m", "autoresearch", "stop"], cwd=arepo, env=env, capture_output=True,
                       timeout=90)
        ray.shutdown()


def test_resumes_an_edit_committed_but_never_run(arepo):
    """Stopped in the instant between the harness's commit and the run: the next start runs that commit."""
    assert ar(arepo, "run", "-m", "baseline").returncode == 0
    text = edit(arepo, BPB=0.9)
    git(arepo, "commit", "-q", "-am", "lower BPB")
    os.makedirs(os.path.join(arepo, ".autoresearch"), exist_ok=True)
    with open(os.path.join(arepo, ".autoresearch", "agent.json"), "w") as f:
        json.dump({"pending": {"content_hash": agent.text_hash(text), "description": "lower BPB"}}, f)
    with ScriptedServer([]) as server:
        r = run_agent(arepo, server, "--max-experiments", "1")
    assert r.returncode == 0 and "committed, never run" in r.stdout, r.stdout + r.stderr
    assert [(x["description"], x["verdict"]) for x in runs(arepo)] == [("baseline", "keep"), ("lower BPB", "keep")]
    assert not server.requests

