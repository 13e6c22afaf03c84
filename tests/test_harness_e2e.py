"""
End to end: the real train.py and prepare.py, copied into a throwaway git repository, run through the harness
for a few seconds of training on the bundled sample corpus (the `prepared_cache` fixture in conftest.py).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from autoresearch import sandbox

BUDGET = "5"             # training seconds
EVAL_TOKENS = "16384"    # a small slice of validation: the point is the plumbing, not the number


def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.slow
def test_real_train_py_through_the_harness(tmp_path, prepared_cache):
    repo = str(tmp_path / "repo")
    os.makedirs(repo)
    for name in ("train.py", "prepare.py", "data_cache.py", "local_corpus.py", "token_shards.py", "fused_ops.py",
                 "scoring.py"):
        shutil.copy(os.path.join(ROOT, name), repo)
    with open(os.path.join(repo, ".gitignore"), "w") as f:
        f.write("results.tsv\nrun.log\nprogress.png\n.autoresearch/\n__pycache__/\n")
    git(repo, "init", "-q", "-b", "autoresearch/e2e")
    git(repo, "config", "user.email", "test@example.com")
    git(repo, "config", "user.name", "test")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "initial")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(PYTHONPATH=ROOT, AUTORESEARCH_CACHE=prepared_cache, AUTORESEARCH_EVAL_TOKENS=EVAL_TOKENS)

    def ar(*args):
        return subprocess.run([sys.executable, "-m", "autoresearch", *args], cwd=repo, capture_output=True,
                              text=True, env=env, timeout=600)

    r = ar("run", "-m", "baseline", "--budget", BUDGET)
    assert r.returncode == 0, r.stdout + r.stderr + open(os.path.join(repo, "run.log")).read()
    assert "verdict:      keep" in r.stdout
    rec = json.loads(open(os.path.join(repo, ".autoresearch", "ledger.jsonl")).readline())
    assert rec["verdict"] == "keep" and 0 < rec["val_bpb"] < 20
    for key in ("training_seconds", "total_seconds", "startup_seconds", "eval_seconds", "peak_vram_mb", "num_steps",
                "total_tokens_M", "eval_tokens"):
        assert key in rec["metrics"], key
    # the harness's figures: val_bpb from its own evaluation (train.py printed the same number, sent back to it)
    printed = [line for line in open(os.path.join(repo, "run.log")) if line.startswith("val_bpb:")]
    assert printed and float(printed[-1].split()[1]) == pytest.approx(rec["val_bpb"], abs=1e-6)
    assert rec["sandbox"] == "bubblewrap" or not sandbox.check()[0]
    assert rec["overhead_seconds"] < 5  # the harness's own share of the wall time
    kept = git(repo, "rev-parse", "HEAD")

    # a broken edit: crash, and train.py is back to the kept version
    original = open(os.path.join(repo, "train.py")).read()
    with open(os.path.join(repo, "train.py"), "w") as f:  # broken before its hand-over: a crash
        f.write(original.replace("def main():", "raise SystemExit('broken on purpose')\n\n\ndef main():", 1))
    r = ar("run", "-m", "broken", "--budget", BUDGET)
    assert r.returncode == 1 and "verdict:      crash" in r.stdout
    assert git(repo, "rev-parse", "HEAD") == kept and open(os.path.join(repo, "train.py")).read() == original

    rows = open(os.path.join(repo, "results.tsv")).read().splitlines()
    assert rows[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription" and len(rows) == 3
    assert ar("status").returncode == 0 and ar("plot").returncode == 0

    # cheats on the metric, from inside train.py: none reaches the evaluation, which runs in a process of its own
    # (a wide margin: only a cheat that worked, halving val_bpb, could be kept)
    def cheat(description, before, code):
        text = original.replace(before, code + before, 1)
        assert text != original
        with open(os.path.join(repo, "train.py"), "w") as f:
            f.write(text)
        r = ar("run", "-m", description, "--budget", BUDGET, "--margin", "0.3")
        assert "verdict:      keep" not in r.stdout, r.stdout
        return r, json.loads(open(os.path.join(repo, ".autoresearch", "ledger.jsonl")).readlines()[-1])

    imports = "import mlx.core as mx\n"
    r, last = cheat("token bytes x2, a kinder metric on fewer tokens", imports,
                    "import prepare\n_tb = prepare.get_token_bytes\nprepare.get_token_bytes = lambda: _tb() * 2\n"
                    "prepare.EVAL_TOKENS = 2048\nprepare.evaluate_bpb = lambda *args, **kwargs: (0.1, 2048)\n")
    assert last["verdict"] == "discard" and last["val_bpb"] > 0.8 * rec["val_bpb"], r.stdout
    assert last["metrics"]["eval_tokens"] == int(EVAL_TOKENS)  # the harness's evaluation size
    original_causal = 'return sdpa(q, k, v, "causal")\n    if SHORT_WINDOW'
    with open(os.path.join(repo, "train.py"), "w") as f:
        f.write(original.replace(original_causal, 'return sdpa(q, k, v, None)\n    if SHORT_WINDOW', 1))
    r = ar("run", "-m", "no causal mask", "--budget", BUDGET)
    assert r.returncode == 1 and "verdict:      crash" in r.stdout and "sees the future" in r.stdout, r.stdout
