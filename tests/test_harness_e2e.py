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

BUDGET = "5"             # training seconds
EVAL_TOKENS = "16384"    # a small slice of validation: the point is the plumbing, not the number


def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.slow
def test_real_train_py_through_the_harness(tmp_path, prepared_cache):
    repo = str(tmp_path / "repo")
    os.makedirs(repo)
    for name in ("train.py", "prepare.py", "data_cache.py", "local_corpus.py", "token_shards.py", "fused_ops.py"):
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
    for key in ("training_seconds", "total_seconds", "peak_vram_mb", "num_steps", "depth"):
        assert key in rec["metrics"], key
    assert rec["overhead_seconds"] < 5  # the harness's own share of the wall time
    kept = git(repo, "rev-parse", "HEAD")

    # a broken edit: crash, and train.py is back to the kept version
    original = open(os.path.join(repo, "train.py")).read()
    with open(os.path.join(repo, "train.py"), "a") as f:
        f.write("\nraise SystemExit('broken on purpose')\n")
    r = ar("run", "-m", "broken", "--budget", BUDGET)
    assert r.returncode == 1 and "verdict:      crash" in r.stdout
    assert git(repo, "rev-parse", "HEAD") == kept and open(os.path.join(repo, "train.py")).read() == original

    rows = open(os.path.join(repo, "results.tsv")).read().splitlines()
    assert rows[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription" and len(rows) == 3
    assert ar("status").returncode == 0 and ar("plot").returncode == 0
