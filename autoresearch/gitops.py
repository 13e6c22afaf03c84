"""
The few git operations the harness needs. Every one of them touches train.py only:
other files, staged or not, are never rewritten, so a user's own work can't be lost.
"""

import ast
import functools
import hashlib
import os
import re
import subprocess

from autoresearch.common import Refusal

TRAIN_FILE = "train.py"
BRANCH_PATTERN = re.compile(r"^autoresearch/[A-Za-z0-9._-]+$")
# used only when the repository has no identity configured, so a fresh clone still works
FALLBACK_IDENTITY = {"GIT_AUTHOR_NAME": "autoresearch", "GIT_AUTHOR_EMAIL": "autoresearch@localhost",
                     "GIT_COMMITTER_NAME": "autoresearch", "GIT_COMMITTER_EMAIL": "autoresearch@localhost"}


def git(root, *args, check=True, env=None, strip=True, input=None):
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, input=input,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip() if strip else proc.stdout


def repo_root(cwd="."):
    proc = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise Refusal(f"not inside a git repository ({os.path.abspath(cwd)}). "
                      "autoresearch works on a clone of the project: cd into it first.")
    return proc.stdout.strip()


def current_branch(root):
    return git(root, "symbolic-ref", "--quiet", "--short", "HEAD", check=False) or None


def head(root):
    return git(root, "rev-parse", "--verify", "--quiet", "HEAD", check=False) or None


def check_branch(root):
    """Experiments only run on a dedicated branch, so main is never rewritten."""
    branch = current_branch(root)
    if branch is None or not BRANCH_PATTERN.match(branch):
        where = f"branch '{branch}'" if branch else "a detached HEAD"
        raise Refusal(f"you are on {where}; experiments run only on a branch named autoresearch/<tag>.\n"
                      "  Start one with: git checkout -b autoresearch/<tag> main   (e.g. autoresearch/nov24)")
    if head(root) is None:
        raise Refusal(f"branch {branch} has no commits yet; commit train.py first.")
    return branch


def dirty_files(root):
    """Tracked files with staged or unstaged changes (untracked files are never touched, so they don't count)."""
    out = git(root, "status", "--porcelain=v1", "--untracked-files=no", "-z", strip=False)
    paths = []
    entries = out.split("\0")
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if not entry:
            continue
        status, path = entry[:2], entry[3:]
        if "R" in status or "C" in status:
            i += 1  # renames/copies are followed by their source path
        paths.append(path)
    return paths


def check_clean(root, allow_train=True):
    others = [p for p in dirty_files(root) if not (allow_train and p == TRAIN_FILE)]
    if others:
        listing = "\n".join(f"    {p}" for p in others[:20])
        raise Refusal("uncommitted changes to files other than train.py:\n" + listing + "\n"
                      "  The harness only ever commits or resets train.py. Commit these yourself, or "
                      "stash them, before running an experiment.")
    if not is_tracked(root, TRAIN_FILE):
        raise Refusal("train.py is not tracked by git here; commit it once (git add train.py && git commit) first.")
    missing = untracked_imports(root)
    if missing:
        raise Refusal(f"train.py imports {', '.join(missing)}, which git does not track: the harness commits train.py "
                      "alone, so a kept commit would not run without it. Put that code in train.py.")


def untracked_imports(root):
    """Files or folders beside train.py that it imports and git does not track."""
    try:
        with open(os.path.join(root, TRAIN_FILE)) as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return []  # a train.py that does not parse is a crash of its own
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    return [path for name in sorted(names) for path in (f"{name}.py", name)
            if os.path.exists(os.path.join(root, path)) and not is_tracked(root, path)]


def is_tracked(root, path):
    return bool(git(root, "ls-files", "--", path))


def train_changed(root):
    """True if train.py in the working tree or index differs from HEAD."""
    return bool(git(root, "diff", "--name-only", "HEAD", "--", TRAIN_FILE))


def hash_bytes(data):
    """The short hash that names a train.py's content everywhere (ledger, pools, the agent's tried set)."""
    return hashlib.sha256(data).hexdigest()[:16]


def content_hash(root):
    """A short hash of train.py's bytes, or None if there is no train.py."""
    try:
        with open(os.path.join(root, TRAIN_FILE), "rb") as f:
            return hash_bytes(f.read())
    except FileNotFoundError:
        return None


def read_train(root):
    with open(os.path.join(root, TRAIN_FILE), "rb") as f:
        return f.read()


def write_train(root, data):
    with open(os.path.join(root, TRAIN_FILE), "wb") as f:
        f.write(data)


def has_identity(root):
    return bool(git(root, "config", "user.email", check=False)) and bool(git(root, "config", "user.name", check=False))


# Trailers that mark the commits the harness makes, so a branch's own harness commits can be told apart (a branch
# made from another autoresearch branch carries that branch's in its history, under the other name):
#   Autoresearch-Branch      the branch it was made for (every harness commit)
#   Autoresearch-Experiment  a candidate of `autoresearch run`: experiment number N, which gets a record
#   Autoresearch-Candidate   a candidate of parallel mode (cN), committed on the branch when kept
#   Autoresearch-Revert      a commit that restores train.py to the kept commit named
TRAILER_BRANCH, TRAILER_EXPERIMENT = "Autoresearch-Branch", "Autoresearch-Experiment"
TRAILER_CANDIDATE, TRAILER_REVERT = "Autoresearch-Candidate", "Autoresearch-Revert"
CANDIDATE_TRAILERS = (TRAILER_EXPERIMENT, TRAILER_CANDIDATE)  # commits that a ledger record of kind "run" names


def harness_message(message, branch, **trailers):
    """A commit message with the harness's trailers (`experiment=5` becomes `Autoresearch-Experiment: 5`)."""
    lines = [f"{TRAILER_BRANCH}: {branch}"] + [f"Autoresearch-{k.capitalize()}: {v}" for k, v in trailers.items()
                                               if v is not None]
    return f"{message.rstrip()}\n\n" + "\n".join(lines) + "\n"


def parse_trailers(text):
    """{key: value} of the Autoresearch-* trailers in `git log --format=%(trailers:only,unfold)` output."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.startswith("Autoresearch-"):
            out[key] = value.strip()
    return out


def trailers(root, commit="HEAD"):
    """The Autoresearch-* trailers of one commit (one git call)."""
    return parse_trailers(git(root, "log", "-1", "--format=%(trailers:only,unfold)", commit, "--", check=False))


def harness_commits(root, branch, ref="HEAD"):
    """[(commit, trailers)] of the commits in ref's history that the harness made for `branch`, newest first
    (one git call)."""
    out = git(root, "log", "--fixed-strings", f"--grep={TRAILER_BRANCH}: {branch}",
              "--format=%H%x1f%(trailers:only,unfold)%x1e", ref, "--", check=False, strip=False)
    found = []
    for entry in out.split("\x1e"):
        commit, _, text = entry.strip().partition("\x1f")
        t = parse_trailers(text)
        if commit and t.get(TRAILER_BRANCH) == branch:
            found.append((commit, t))
    return found


def commit_train(root, message, exp=None):
    """Commit train.py alone (whatever else is staged stays staged), marked as experiment `exp` of this branch;
    returns the new HEAD."""
    env = None if has_identity(root) else FALLBACK_IDENTITY
    text = harness_message(message, current_branch(root), experiment=exp)
    git(root, "commit", "--quiet", "--only", "--cleanup=verbatim", "-F", "-", "--", TRAIN_FILE, env=env, input=text)
    return head(root)


def is_ancestor(root, older, newer):
    return subprocess.run(["git", "merge-base", "--is-ancestor", older, newer], cwd=root,
                          capture_output=True).returncode == 0


def history(root, ref="HEAD", empty=True):
    """`in_history(commit)`: is the commit in ref's history? One git call per commit, for one reading of the
    ledger (a later commit or reset needs a new predicate). Where ref does not exist: `empty` for every commit."""
    if rev(root, ref) is None:
        return lambda commit: empty
    return functools.lru_cache(maxsize=None)(lambda commit: is_ancestor(root, commit, ref))


def revert_train(root, kept, message):
    """Bring train.py back to the kept commit. If every commit since `kept` only touched train.py, the branch
    simply moves back to `kept` (clean history); otherwise it gets one new commit restoring train.py, so other
    committed work stays on the branch. Returns how it was done."""
    changed = set(git(root, "diff", "--name-only", kept, "HEAD").split())
    if changed <= {TRAIN_FILE}:
        git(root, "reset", "--quiet", "--soft", kept)
        git(root, "checkout", kept, "--", TRAIN_FILE)
        return "branch moved back"
    git(root, "checkout", kept, "--", TRAIN_FILE)
    env = None if has_identity(root) else FALLBACK_IDENTITY
    text = harness_message(message, current_branch(root), revert=kept)
    git(root, "commit", "--quiet", "--only", "--cleanup=verbatim", "-F", "-", "--", TRAIN_FILE, env=env, input=text)
    return "restore commit"


def undo_commit(root, candidate, base):
    """An interrupted run: drop the candidate commit but leave its train.py in the working tree, exactly as
    before the run, so the user can simply run it again."""
    if head(root) != candidate:
        return False  # someone committed meanwhile: leave it alone
    git(root, "reset", "--quiet", "--soft", base)
    git(root, "reset", "--quiet", base, "--", TRAIN_FILE)  # unstage, keep the file's contents
    return True


# ---------------------------------------------------------------------------
# plumbing for parallel candidates: commits made without touching the working tree, index or HEAD

def write_train_blob(root):
    """Store the working tree's train.py in git's object database; returns its blob id."""
    return git(root, "hash-object", "-w", "--", TRAIN_FILE)


def blob_at(root, commit, path=TRAIN_FILE):
    return git(root, "rev-parse", "--verify", "--quiet", f"{commit}:{path}", check=False) or None


def commit_blob_on(root, parent, blob, message):
    """A new commit on top of `parent`: its tree with train.py replaced by `blob`, nothing else changed.
    Built in a private index, so the user's index, working tree and branch are left alone."""
    env = {"GIT_INDEX_FILE": os.path.join(git(root, "rev-parse", "--absolute-git-dir"), "autoresearch-index")}
    if not has_identity(root):
        env.update(FALLBACK_IDENTITY)
    git(root, "read-tree", parent, env=env)
    git(root, "update-index", "--cacheinfo", f"100644,{blob},{TRAIN_FILE}", env=env)
    tree = git(root, "write-tree", env=env)
    return git(root, "commit-tree", tree, "-p", parent, "-m", message, env=env)


def update_ref(root, ref, new, old=None, reflog=False):
    """Move a ref, only if it still points at `old` (compare and swap; NO_COMMIT: only if it does not exist yet).
    Returns False if it moved meanwhile. `reflog`: keep a reflog for it, so an older value can be found again."""
    args = ["update-ref", "-m", "autoresearch"] + (["--create-reflog"] if reflog else []) + [ref, new]
    return subprocess.run(["git", *args + ([old] if old else [])], cwd=root, capture_output=True).returncode == 0


# ---------------------------------------------------------------------------
# git's copy of the ledger: refs/autoresearch/ledger, one commit per record (the record's JSON line is the commit
# message, the tree is empty), oldest first along the first parents. In .git, out of the working tree.

LEDGER_REF = "refs/autoresearch/ledger"
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
NO_COMMIT = "0" * 40


def is_repository(root):
    return subprocess.run(["git", "rev-parse", "--git-dir"], cwd=root, capture_output=True).returncode == 0


def ledger_lines(root):
    """Every record line in git's copy, oldest first: [] if there is none yet, None outside a git repository."""
    proc = subprocess.run(["git", "log", "--first-parent", "--reverse", "--format=%B%x1e", LEDGER_REF, "--"],
                          cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        if not is_repository(root):
            return None
        if rev(root, LEDGER_REF) is None:
            return []
        raise RuntimeError(f"git log {LEDGER_REF} failed ({proc.returncode}): {proc.stderr.strip()}")
    return [part.strip() for part in proc.stdout.split("\x1e") if part.strip()]


def ledger_tip(root):
    """(tip commit, its record line) of git's copy: (None, None) if there is none yet, None outside a repository."""
    out = git(root, "log", "-1", "--format=%H%x00%B", LEDGER_REF, "--", check=False)
    if not out:
        if not is_repository(root):
            return None
        if rev(root, LEDGER_REF) is not None:
            raise RuntimeError(f"cannot read {LEDGER_REF}")
        return None, None
    tip, _, line = out.partition("\0")
    return tip, line.strip()


def ledger_append(root, lines, tip):
    """Add record lines to git's copy on top of `tip` (None: the first ones): one commit each, then one compare-and-
    swap of the ref. Returns the new tip, or None if the ref moved meanwhile (nothing changed then)."""
    new = tip
    for line in lines:
        new = git(root, "commit-tree", "--no-gpg-sign", EMPTY_TREE, *(["-p", new] if new else []), "-F", "-",
                  env=FALLBACK_IDENTITY, input=line.rstrip("\n") + "\n")
    return new if update_ref(root, LEDGER_REF, new, tip or NO_COMMIT, reflog=True) else None


def rev(root, ref):
    return git(root, "rev-parse", "--verify", "--quiet", ref, check=False) or None
