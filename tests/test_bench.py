"""Smoke tests of the benchmarks on CPU (small configs), so they keep working as train.py and the harness change."""
import math
import os
import re
import subprocess
import sys

import numpy as np
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


def test_step_profile_prints_its_tables(tmp_path):
    # the baseline row takes any train.py; the current one stands in for an older version here
    baseline = tmp_path / "old_train.py"
    baseline.write_text(open(os.path.join(ROOT, "train.py")).read())
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "step_profile.py"), "--warmup", "1",
                             "--iters", "1", "--baseline", str(baseline), "--kernels", "5"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = re.findall(r"^\| ([^|]+) \| ([\d.]+) \| ([\d,]+) \| ([\d.]+) \| ([\d.]+) \|$", result.stdout, flags=re.M)
    labels = [label for label, *_ in rows]
    assert labels[:2] == ["baseline: old_train.py", "train.py as is"] and len(rows) == 6, result.stdout
    assert all(float(ms) > 0 and float(tok.replace(",", "")) > 0 for _, ms, tok, _, _ in rows)
    attention = re.findall(r"^\| (full causal \(L\)|sliding window \d+, query blocks of \d+|chunked window \d+) \| ([\d.]+) \|$",
                           result.stdout, flags=re.M)
    assert len(attention) == 5 and all(float(ms) > 0 for _, ms in attention), result.stdout
    assert len(re.findall(r"^\| (fused kernel where available|MLX ops) \| [\d.]+ \| [\d.]+ \|$", result.stdout, flags=re.M)) == 2
    assert "(--kernels: skipped, it profiles CUDA kernels)" in result.stdout  # CPU: no CUDA kernels to list


def test_kernel_table_ranks_kernels_by_time():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import step_profile
    kernels = {"copy": (1.0, 4), "gemm|nt": (6.0, 2), "x" * 200: (3.0, 1)}
    lines = step_profile.kernel_table(kernels, top=2)
    assert lines[0] == "| all 7 launches | 10.00 | | 100 % |"
    assert lines[1] == "| gemm/nt | 6.000 | 2 | 60.0 % |"  # a | in a name would break the table
    assert lines[2].startswith("| " + "x" * 107 + "... | 3.000 | 1 | 30.0 % |") and len(lines) == 3


@pytest.mark.slow
def test_parallel_scaling_prints_a_row_per_worker_count():
    pytest.importorskip("ray", reason="parallel mode needs Ray: uv sync --extra parallel")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "parallel_scaling.py"), "--workers", "1",
                             "2", "--candidates", "3", "--sleep", "0.5"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d,]+) \| ([\d.]+)x \| ([\d.]+) \| ([-\d,]+) \| ([^|]+) \|$",
                      result.stdout, flags=re.M)
    assert [workers for workers, *_ in rows] == ["1", "2"], result.stdout
    assert rows[0][3] == "1.00" and all(float(wall) > 0 and float(rate.replace(",", "")) > 0
                                        for _, wall, rate, *_ in rows)
    assert all(row[5] == "-" for row in rows)  # the stand-in trains nothing: no throughput is made up
    for *_, verdicts in rows:  # every candidate got a verdict, and the stand-in never crashes
        counts = dict((status, int(n)) for n, status in re.findall(r"(\d+) (\w+)", verdicts))
        assert sum(counts.values()) == 3 and "crash" not in counts, result.stdout


def test_loader_speed_prints_both_loaders(prepared_cache):
    env = {**os.environ, "AUTORESEARCH_CACHE": prepared_cache}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "loader_speed.py"), "--seconds", "0.5",
                             "--batch", "4", "--cache-limit", "0", "--threads", "1"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = re.findall(r"^\| (memory-mapped token shards|tokenized on the fly \(cache limit 0\)) \| (-|1) \| ([\d,]+) \| "
                      r"([\d,]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", result.stdout, flags=re.M)
    assert [row[0] for row in rows] == ["memory-mapped token shards", "tokenized on the fly (cache limit 0)"], result.stdout
    for _, _, batches, tok_s, ms, cpu_ms, busy in rows:
        assert int(batches.replace(",", "")) > 0 and float(tok_s.replace(",", "")) > 0 and float(ms) > 0


def test_eval_precision_subsets_are_disjoint_and_scale():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import eval_precision
    rng = np.random.default_rng(0)
    nbytes = rng.integers(5000, 9000, 400)
    nats = nbytes * math.log(2) * (2.0 + 0.3 * rng.standard_normal(400))  # ~2 bits per byte, noisy rows
    std, scaled, k = eval_precision.subset_stds(nats, nbytes, 16)
    assert k == 25  # 400 rows make 25 disjoint subsets of 16
    groups = [nats[i:i + 16].sum() / (math.log(2) * nbytes[i:i + 16].sum()) for i in range(0, 400, 16)]
    assert std == pytest.approx(np.std(groups, ddof=1))
    assert scaled == pytest.approx(std, rel=0.4)  # rows drawn independently: the 1/sqrt(n) estimate holds
    assert eval_precision.subset_stds(nats, nbytes, 256)[0] is None  # one subset: no spread to measure


@pytest.mark.slow
def test_eval_precision_benchmark_prints_its_table(prepared_cache):
    env = {**os.environ, "AUTORESEARCH_CACHE": prepared_cache}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "eval_precision.py"), "--budget", "2",
                             "--seeds", "1", "2", "--max-rows", "4", "--sizes", "1", "2"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = re.findall(r"^ +(\d+) +(\d+) +(\d+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+)$", result.stdout, flags=re.M)
    assert [(n, k) for n, _, k, *_ in rows] == [("1", "4"), ("2", "2")], result.stdout
    assert all(float(v) > 0 for row in rows for v in row[3:])


@pytest.mark.slow
def test_causal_check_benchmark_prints_its_cost(prepared_cache):
    env = {**os.environ, "AUTORESEARCH_CACHE": prepared_cache, "AUTORESEARCH_EVAL_TOKENS": "8192"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "causal_check.py"), "--reps", "1"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "8,192 tokens" in result.stdout, result.stdout
    off, on = (float(v) for v in re.findall(r"^\| (?:evaluation without the check|with the check) \| ([\d.]+) s \|$",
                                            result.stdout, flags=re.M))
    assert on > 0 and off > 0
