"""
Where results live.

- .autoresearch/ledger.jsonl: every train.py process the harness ever ran, one JSON object a line, append-only
  and fsync'ed. Each record carries its sequence number (`seq`, from 0) and the hash of the record before it
  (`prev`): a chain, so a line edited, removed or added shows.
- git's copy of the same records, refs/autoresearch/ledger (one commit a record, written first): in .git, out of
  the working tree that train.py and accidents reach. The source of truth: a missing, shorter or edited file is
  rebuilt from it (read_ledger), and a file without a git copy (written before there was one) is stored there.
- results.tsv: one row per experiment, the short view the agent reads, rewritten from the ledger after each one.
  A remeasurement of a kept commit (--rerun) has no row of its own: it moves that commit's pooled mean.
- .autoresearch/noise.json: the latest noise estimate per branch, replaced atomically.
"""

import fcntl
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager

from autoresearch import gate, gitops

STATE_DIR = ".autoresearch"
LEDGER_FILE = "ledger.jsonl"
NOISE_FILE = "noise.json"
RESULTS_FILE = "results.tsv"
WRITE_LOCK = "ledger.lock"
LEDGER_NAME = os.path.join(STATE_DIR, LEDGER_FILE)  # as messages name it
RESULTS_HEADER = ["commit", "val_bpb", "memory_gb", "status", "description"]
STATUSES = {"keep", "discard", "crash", "interrupted"}


class LedgerError(Exception):
    """A state file is damaged; printed with the path and line so a human can fix it."""


def state_dir(root):
    path = os.path.join(root, STATE_DIR)
    os.makedirs(path, exist_ok=True)
    return path


def read_state_file(root, name):
    """A JSON file under .autoresearch/ that a process rewrites atomically (serve.json, agent.json), or None if
    it is absent or unreadable: it only reports what that process is doing."""
    try:
        with open(os.path.join(root, STATE_DIR, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def append_line(path, line):
    """Append-only write: one write() of a whole line, then fsync, so a crash can't leave half a record."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, text):
    """Write to a temporary file beside `path`, fsync, then rename over it: readers see old or new, never half."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------
# ledger.jsonl

def _clean(value):
    # JSON has no NaN/inf: store them as strings so the file stays valid JSON for any reader
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def dumps(record):
    return json.dumps(_clean(record), sort_keys=True)


def line_hash(line):
    return hashlib.sha256(line.encode()).hexdigest()[:16]


def record_hash(record):
    """The hash the next record names as its `prev`: of this record's line as stored (its own seq and prev included,
    so the records form a chain)."""
    return line_hash(dumps(record))


def chain_break(records, lines=None):
    """(index, what is wrong) of the first record that does not follow its predecessor in the chain, or None.
    `lines`: the records' lines as stored, if at hand (saves serializing them again)."""
    for i, r in enumerate(records):
        if r.get("seq") != i:
            return i, (f"sequence number {r.get('seq')}, expected {i}" if "seq" in r else "no sequence number")
        if i and r.get("prev") != (line_hash(lines[i - 1]) if lines else record_hash(records[i - 1])):
            return i, "its prev hash does not match the record before it"
        if not i and r.get("prev") is not None:
            return i, "the first record names a record before it"
    return None


def _chained(record, last):
    """The record as stored: with its sequence number and the hash of the record before it (`last`, or None)."""
    return {**record, "seq": last["seq"] + 1 if last else 0, "prev": record_hash(last) if last else None}


@contextmanager
def _writing(root):
    """Serializes writers of the ledger (an append: git's copy, then the file; a rebuild of the file), so a reader
    never mistakes an append half done for a damaged file. Held for milliseconds; a killed holder drops it."""
    fd = os.open(os.path.join(state_dir(root), WRITE_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def append_record(root, record):
    """Append one record: to git's copy first (refs/autoresearch/ledger), then to the file. A harness killed in
    between leaves the file one record short, which the next read_ledger rebuilds from git; a file that no longer
    ends where git's copy did (damaged during the run, or behind another worktree's records) is rewritten from git.
    Returns the record as stored (with its seq and prev)."""
    with _writing(root):
        for _ in range(3):
            tip = gitops.ledger_tip(root)
            if tip is None:  # not a git repository (never the harness's case): the file alone, as before
                append_line(ledger_path(root), dumps(record))
                return record
            commit, line = tip
            file_lines = _file_lines(root)
            if commit is None and file_lines:
                break  # git has no copy yet but the file has records: they go to git first
            stored = _chained(record, json.loads(line) if line else None)
            if not gitops.ledger_append(root, [dumps(stored)], commit):
                continue  # another worktree of this repository added a record meanwhile
            if (file_lines[-1][1] if file_lines else None) == line:
                append_line(ledger_path(root), dumps(stored))
            else:
                git_lines = gitops.ledger_lines(root)
                _rebuild(root, [(n, text, *_parse(LEDGER_NAME, n, text)) for n, text in file_lines],
                         [json.loads(x) for x in git_lines], git_lines, results=False)
            return stored
        else:
            raise LedgerError(f"{gitops.LEDGER_REF} kept moving while a record was added to it: is another program "
                              "writing it?")
    read_ledger(root)
    return append_record(root, record)


def ledger_path(root):
    return os.path.join(root, STATE_DIR, LEDGER_FILE)


def _file_lines(root):
    """[(line number, text)] of the non-blank lines of the ledger file ([] if it is missing)."""
    try:
        with open(ledger_path(root)) as f:
            return [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]
    except FileNotFoundError:
        return []


def _parse(path, lineno, text):
    """(record, None) or (None, what is wrong with the line)."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"{path} line {lineno} is not valid JSON ({e.msg})"
    if not isinstance(record, dict) or "kind" not in record:
        return None, f"{path} line {lineno} is not a ledger record (no 'kind')"
    return record, None


def read_ledger(root):
    """Every record, oldest first, from the file checked against git's copy. A file that is missing, shorter than
    git's copy, edited or otherwise unlike it is rebuilt from git (git wins: the file is in the working tree, where
    an accident or train.py can reach it), saying so in one line on stderr, and results.tsv is rewritten from it.
    A repository whose git copy is missing gets one from an intact file. Refused (LedgerError): a file whose chain is
    broken with no copy in git, and a branch with harness commits or a results.tsv longer than what is left."""
    records = _reconcile(root)
    _check_nothing_lost(root, records)
    return records


def _reconcile(root, locked=False):
    path = LEDGER_NAME
    file_lines = _file_lines(root)
    git_lines = gitops.ledger_lines(root)
    if git_lines is None:  # not a git repository: the file alone
        entries = [(n, text, *_parse(path, n, text)) for n, text in file_lines]
        bad = next((why for _, _, rec, why in entries if why), None)
        if bad:
            raise LedgerError(bad + ". The ledger is append-only: move the damaged line out of the file (keep a copy) "
                              "and try again.")
        return [rec for _, _, rec, _ in entries]
    try:
        git_records = [json.loads(line) for line in git_lines]
        broken = chain_break(git_records, git_lines)
    except (ValueError, AttributeError):
        broken = (None, "a record that is not a JSON object")
    if broken:
        raise LedgerError(f"git's copy of the ledger ({gitops.LEDGER_REF}) is damaged at record {broken[0]} "
                          f"({broken[1]}); only the harness writes it: `git reflog {gitops.LEDGER_REF}` lists its "
                          "earlier states, `git update-ref` puts one back.")
    if [text for _, text in file_lines] == git_lines:
        return git_records
    if not locked:
        with _writing(root):
            return _reconcile(root, locked=True)
    entries = [(n, text, *_parse(path, n, text)) for n, text in file_lines]
    _check_rows(root, git_records or [rec for _, _, rec, _ in entries if rec])  # before anything is rewritten
    if not git_records:
        return _store_in_git(root, path, entries)
    _rebuild(root, entries, git_records, git_lines)
    return git_records


def _store_in_git(root, path, entries):
    """git has no copy yet (a ledger from before git kept one, or the ref was lost): store the file's records,
    if its chain is intact. A ledger of records without sequence numbers (written before) gets them now."""
    bad = next((why for _, _, rec, why in entries if why), None)
    if bad:
        raise LedgerError(bad + f", and git holds no copy to rebuild from ({gitops.LEDGER_REF}): move the damaged line "
                          "out of the file (keep a copy) and try again.")
    records = [rec for _, _, rec, _ in entries]
    upgraded = not any("seq" in r for r in records)
    if upgraded:
        chained = []
        for r in records:
            chained.append(_chained(r, chained[-1] if chained else None))
        records = chained
    broken = chain_break(records)
    if broken:
        i, why = broken
        raise LedgerError(f"{path} line {entries[i][0]} breaks the ledger's chain ({why}): a record was edited, "
                          f"removed or added by hand, and git holds no copy to rebuild from ({gitops.LEDGER_REF} is "
                          "missing). Restore the file from a backup, or fetch that ref from the clone that made it "
                          f"(git fetch <remote> {gitops.LEDGER_REF}:{gitops.LEDGER_REF}).")
    lines = [dumps(r) for r in records]
    if gitops.ledger_append(root, lines, None) is None:
        raise LedgerError(f"{gitops.LEDGER_REF} appeared while the ledger was being stored in it: try again.")
    if upgraded:
        write_atomic(os.path.join(state_dir(root), LEDGER_FILE), "".join(line + "\n" for line in lines))
    warn(f"stored the ledger's {len(records)} record(s) in git ({gitops.LEDGER_REF}), out of the working tree: from "
         f"now on a lost or damaged {path} is rebuilt from there")
    return records


def _describe(record):
    what = [f"record {record.get('seq')}"]
    if record.get("exp") is not None:
        what.append(f"experiment #{record['exp']}")
    if record.get("kind") != "run":
        what.append(str(record.get("kind")))
    return ", ".join(what) + f", commit {str(record.get('commit'))[:7]}"


def _difference(path, entries, git_records, git_lines):
    """What is wrong with the file, against git's copy, in a few words."""
    for i, (lineno, text, rec, why) in enumerate(entries):
        if i >= len(git_lines):
            if why:
                return why
            return (f"{path} has {len(entries) - i} line(s) after git's last record (from line {lineno}) that git "
                    "does not hold")
        if text == git_lines[i]:
            continue
        if why:
            return why
        g = git_records[i]
        if rec.get("seq") == g["seq"]:
            keys = sorted(k for k in set(rec) | set(g) if rec.get(k) != g.get(k))
            if not keys:
                return f"{path} line {lineno} ({_describe(g)}) is written differently from git's copy (same values)"
            return f"{path} line {lineno} ({_describe(g)}) differs from git's copy in {', '.join(keys)}"
        if isinstance(rec.get("seq"), int) and rec["seq"] > g["seq"]:
            return f"{path} lacks {_describe(g)}, which git holds (line {lineno} is record {rec['seq']}): a line removed"
        return f"{path} line {lineno} is not git's record {g['seq']} ({_describe(g)})"
    return (f"{path} holds {len(entries)} of the {len(git_lines)} records git holds (the last "
            f"{len(git_lines) - len(entries)} missing: truncated)")


def _rebuild(root, entries, git_records, git_lines, results=True):
    """Rewrite the file from git's copy, then results.tsv from it, and say so. A file that held anything git's copy
    does not (an edited or added line) is kept beside it."""
    full = os.path.join(state_dir(root), LEDGER_FILE)
    texts = [text for _, text, _, _ in entries]
    kept = ""
    if not os.path.exists(full):
        what = f"{LEDGER_NAME} is missing"
    elif texts == git_lines[:len(texts)]:  # nothing lost by rewriting it
        what = (f"{LEDGER_NAME} lacks the last {len(git_lines) - len(texts)} of the {len(git_lines)} records git holds "
                "(truncated, or added from another worktree of this repository)")
    else:
        what = _difference(LEDGER_NAME, entries, git_records, git_lines) + "; git wins"
        stamp, n = time.strftime("%Y%m%dT%H%M%S"), 1
        while os.path.exists(backup := f"{full}.replaced-{stamp}" + (f"-{n}" if n > 1 else "")):
            n += 1
        os.replace(full, backup)
        kept = f", the old file kept as {os.path.relpath(backup, root)}"
    write_atomic(full, "".join(line + "\n" for line in git_lines))
    done = f"; {RESULTS_FILE} rewritten ({write_results(root, git_records)} experiments)" if results else ""
    warn(f"{what}: rebuilt it from the {len(git_lines)} record(s) in {gitops.LEDGER_REF}{kept}{done}")


def _check_nothing_lost(root, records):
    """Refuse a ledger that lost what git's history or results.tsv shows it had: a branch with commits the harness
    made but no records of its own (the next run would be a free baseline), or fewer experiments than results.tsv
    lists (rewriting it would cut rows)."""
    _check_rows(root, records)
    branch = gitops.current_branch(root)
    if not branch or not gitops.BRANCH_PATTERN.match(branch) or gate.branch_records(records, branch):
        return
    made = gitops.harness_commits(root, branch)
    if not made or unrecorded_candidate(made, records, gitops.head(root)):
        return  # nothing made here, or only the candidate of a run killed before its record (the baseline's)
    commit, t = made[0]
    exp = f", experiment #{t[gitops.TRAILER_EXPERIMENT]}" if t.get(gitops.TRAILER_EXPERIMENT) else ""
    raise LedgerError(
        f"branch {branch} has {len(made)} commit(s) the harness made (the latest {commit[:7]}{exp}) but no ledger "
        f"records, neither in {STATE_DIR}/{LEDGER_FILE} nor in git ({gitops.LEDGER_REF}), so a run now would be a free "
        f"baseline. Restore the file from a backup or fetch that ref (git fetch <remote> "
        f"{gitops.LEDGER_REF}:{gitops.LEDGER_REF}), or start a new branch (git checkout -b autoresearch/<new-tag>).")


def _check_rows(root, records):
    """results.tsv is rewritten from the ledger: refuse a ledger with fewer experiments than it lists."""
    try:
        with open(os.path.join(root, RESULTS_FILE)) as f:
            rows = sum(1 for line in f.read().splitlines()[1:] if line.strip())
    except OSError:
        return
    have = len(gate.experiments(records))
    if rows > have:
        raise LedgerError(
            f"{RESULTS_FILE} lists {rows} experiments but the ledger holds {have} ({STATE_DIR}/{LEDGER_FILE}, checked "
            f"against git's {gitops.LEDGER_REF}): records were lost. Restore {STATE_DIR}/{LEDGER_FILE} from a backup "
            f"or fetch {gitops.LEDGER_REF} from the clone that made them; only to start over from what is left, move "
            f"{RESULTS_FILE} away.")


def unrecorded_candidate(made, records, head):
    """True if `made` (harness commits, newest first) is just one candidate at HEAD that has no record and is the
    branch's first experiment (or a parallel candidate): the harness was killed during the baseline."""
    if len(made) != 1 or made[0][0] != head:
        return False
    t = made[0][1]
    return t.get(gitops.TRAILER_EXPERIMENT) in ("1", None) and any(t.get(k) for k in gitops.CANDIDATE_TRAILERS) \
        and not any(r["kind"] == "run" and r.get("commit") == head for r in records)


def unrecorded_head(root, branch, records):
    """The trailers of HEAD if it is a candidate commit the harness made for `branch` that no record of kind "run"
    names (a harness killed mid-run: kill -9, power loss), else None."""
    head = gitops.head(root)
    t = gitops.trailers(root, head) if head else {}
    if t.get(gitops.TRAILER_BRANCH) != branch or not any(t.get(k) for k in gitops.CANDIDATE_TRAILERS):
        return None
    if any(r["kind"] == "run" and r.get("commit") == head for r in records):
        return None
    return t


def candidate_name(t):
    return (f"experiment #{t[gitops.TRAILER_EXPERIMENT]}" if t.get(gitops.TRAILER_EXPERIMENT)
            else f"candidate {t.get(gitops.TRAILER_CANDIDATE)}")


def undo_unrecorded_head(root, branch, records):
    """Undo a candidate commit at HEAD that has no record (unrecorded_head) as an interrupted run is undone: the
    branch goes back one commit, its train.py stays in the working tree to run again. Returns the line to print, or
    None if HEAD is not such a commit."""
    t = unrecorded_head(root, branch, records)
    if t is None:
        return None
    head = gitops.head(root)
    cid = t.get(gitops.TRAILER_CANDIDATE)
    if cid:
        from autoresearch import candidates  # parallel mode's queue (it reads this module)
        if any(c["id"] == cid for c in candidates.Queue(root).pending(candidates.finished_ids(records))):
            raise LedgerError(f"HEAD {head[:7]} is candidate {cid}, kept by the parallel-mode coordinator, which "
                              "stopped before recording it: `autoresearch wait` resumes the queue and records it.")
    parent = gitops.rev(root, f"{head}^")
    if parent is None or gitops.git(root, "diff", "--name-only", parent, head).split() != [gitops.TRAIN_FILE]:
        return None  # not a commit of train.py alone: not one to undo by itself
    if not gitops.undo_commit(root, head, parent):
        return None
    return (f"HEAD {head[:7]} was the candidate commit of {candidate_name(t)}, never recorded (the harness was killed "
            "during its run): commit undone, its train.py left in the working tree to run again")


def warn(line):
    print(f"autoresearch: {line}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# results.tsv

def read_results(root):
    """Parse results.tsv, refusing loudly on anything unexpected rather than appending to a damaged file."""
    path = os.path.join(root, RESULTS_FILE)
    if not os.path.exists(path):
        return []
    hint = (f"Move it away and run `autoresearch rebuild-tsv` to rewrite it from {STATE_DIR}/{LEDGER_FILE} "
            "(the ledger holds every run).")
    with open(path) as f:
        lines = f.read().splitlines()
    if not lines:
        return []
    if lines[0].split("\t") != RESULTS_HEADER:
        raise LedgerError(f"{path}: line 1 should be the tab-separated header "
                          f"'{chr(9).join(RESULTS_HEADER)}', found {lines[0]!r}. {hint}")
    rows = []
    for lineno, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(RESULTS_HEADER):
            raise LedgerError(f"{path}: line {lineno} has {len(fields)} tab-separated fields, expected "
                              f"{len(RESULTS_HEADER)} ({', '.join(RESULTS_HEADER)}): {line!r}. {hint}")
        row = dict(zip(RESULTS_HEADER, fields))
        try:
            float(row["val_bpb"]), float(row["memory_gb"])
        except ValueError:
            raise LedgerError(f"{path}: line {lineno}: val_bpb and memory_gb must be numbers: {line!r}. {hint}") from None
        if row["status"] not in STATUSES:
            raise LedgerError(f"{path}: line {lineno}: status {row['status']!r} is not one of "
                              f"{', '.join(sorted(STATUSES))}. {hint}")
        rows.append(row)
    return rows


def results_row(record, records):
    """The results.tsv row of one experiment record (`records`: its branch's, for the pooled means). Crashes show
    0.000000, as the agent expects; a kept row shows its train.py's pooled mean, the number the gate uses."""
    val = gate.shown_value(records, record)
    val = val if isinstance(val, (int, float)) and math.isfinite(val) and record["verdict"] in ("keep", "discard") else 0.0
    mem = (record.get("metrics") or {}).get("peak_vram_mb")
    mem_gb = mem / 1024 if isinstance(mem, (int, float)) and math.isfinite(mem) and val else 0.0
    desc = " ".join(str(record.get("description", "")).split())  # no tabs or newlines in a TSV cell
    runs = len(gate.pool(records, record.get("content_hash"))) if record["verdict"] == "keep" else record.get("seeds_used", 1)
    if runs > 1 and record["verdict"] in ("keep", "discard"):
        desc += f" [mean of {runs} runs]"
    return [record["commit"][:7], f"{val:.6f}", f"{mem_gb:.1f}", record["verdict"], desc]


def write_results(root, records=None):
    """Rewrite results.tsv from the ledger (all branches, in run order): one row per experiment, the same numbers
    as `status` and `plot`. A view: the ledger is the truth."""
    records = read_ledger(root) if records is None else records
    by_branch = {}
    for r in records:
        by_branch.setdefault(r.get("branch"), []).append(r)
    rows = ["\t".join(RESULTS_HEADER)]
    rows += ["\t".join(results_row(r, by_branch[r.get("branch")])) for r in gate.experiments(records)]
    write_atomic(os.path.join(root, RESULTS_FILE), "\n".join(rows) + "\n")
    return len(rows) - 1


# ---------------------------------------------------------------------------
# noise.json

def _noise_problem(estimate):
    """What is wrong with one branch's noise estimate, or None: the margin, status and every verdict use its std
    and tok/s as numbers, so they are checked here, where the file is read."""
    if not isinstance(estimate, dict):
        return f"an estimate must be a JSON object, found {estimate!r}"
    for key in ("std", "tok_per_sec"):
        v = estimate.get(key)
        # bool is an int to Python, not a number here; NaN and inf are valid JSON to Python's reader
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                  and v >= 0):
            return f"{key} must be a number >= 0, found {v!r}"
    return None


def read_noise(root, branch):
    """This branch's noise estimate, or None if it has none; a LedgerError if the file is damaged."""
    path = os.path.join(root, STATE_DIR, NOISE_FILE)
    if not os.path.exists(path):
        return None
    fix = "delete it and run `autoresearch noise` again"
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LedgerError(f"{path} is damaged (not valid JSON); {fix}.") from None
    if not isinstance(data, dict):
        raise LedgerError(f"{path} is damaged (not a JSON object of branches); {fix}.")
    estimate = data.get(branch)
    problem = _noise_problem(estimate) if estimate is not None else None
    if problem:
        raise LedgerError(f"{path} is damaged ({branch}: {problem}); {fix}.")
    return estimate


def write_noise(root, branch, estimate):
    path = os.path.join(state_dir(root), NOISE_FILE)
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data[branch] = estimate
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
