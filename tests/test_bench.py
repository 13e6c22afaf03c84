"""Smoke test of the training-speed benchmark on CPU (small config), so it keeps working as train.py changes."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_train_speed_benchmark_prints_a_table(prepared_cache):
    env = {**os.environ, "AUTORESEARCH_CACHE": prepared_cache}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_speed.py"), "--budget", "4",
                             "--only", "original"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    row = re.search(r"^\| original \(CPU scale\) \| cpu \| [^|]+ \| ([\d,]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$",
                    result.stdout, flags=re.M)
    assert row, result.stdout
    tok_s, step_ms, mfu, peak_gb, startup = (float(g.replace(",", "")) for g in row.groups())
    assert tok_s > 0 and step_ms > 0 and mfu > 0 and peak_gb > 0 and startup > 0
    assert not [f for f in os.listdir(ROOT) if f.startswith("bench_train_")]  # its temporary copy is gone
