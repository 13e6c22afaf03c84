"""
The operating system's walls around a run: what train.py (and the evaluation after it) can read and write.

On Linux, bubblewrap (`bwrap`; Debian/Ubuntu: `apt install bubblewrap`) starts the process in new namespaces:
- the project is a read-only copy of the committed tree (files git does not track do not exist; .git,
  .autoresearch, results.tsv and run.log are not there), the Python environment is read-only;
- the data cache is read-only, and while training the validation split's files read as empty;
- writable: the run's scratch folder (emptied for each run) and the compiled-kernel caches, nothing else;
- no network, a private /tmp and /dev, its own process namespace: nothing it starts outlives it.
Elsewhere (macOS, a Linux without bwrap or without user namespaces) none of this is enforced: `check()` says why,
and the harness prints it with every run. docs/faults.md ("Cheats") says what each wall stops.
"""

import functools
import glob
import os
import shutil
import subprocess
import sys

SYSTEM_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/opt", "/sys")
GPU_DEVICES = ("/dev/nvidia*", "/dev/nvidia-caps", "/dev/dri")
INSTALL_HINT = "install bubblewrap (Debian/Ubuntu: sudo apt install bubblewrap; Fedora: sudo dnf install bubblewrap)"


@functools.cache
def check():
    """(True, what) when runs can be walled in here, else (False, why not and how to fix it)."""
    if sys.platform != "linux":
        return False, f"no sandbox on {sys.platform}: train.py runs with your user's rights (not enforced: see docs/faults.md)"
    bwrap = shutil.which("bwrap")
    if not bwrap:
        return False, f"bubblewrap is not installed: {INSTALL_HINT}"
    try:
        probe = subprocess.run([bwrap, "--ro-bind", "/", "/", "--unshare-all", "--die-with-parent", "true"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"bubblewrap does not run ({e})"
    if probe.returncode != 0:
        return False, (f"bubblewrap cannot make namespaces here ({probe.stderr.strip()[:200]}); enable unprivileged "
                       "user namespaces (sysctl kernel.unprivileged_userns_clone=1) or run where they are allowed")
    return True, "bubblewrap"


def _bind_dir(args, flag, path):
    """Bind `path` at the same place; a symlink (merged /usr: /lib -> usr/lib) is recreated as a symlink."""
    if os.path.islink(path):
        args += ["--symlink", os.readlink(path), path]
    elif os.path.exists(path):
        args += [flag, path, path]


def command(argv, tree, scratch, cache, writable=(), hidden=(), readable=(), masked=()):
    """bwrap's command line that runs `argv` in `tree` (bound read-only) with `scratch` and `writable` folders
    writable (a folder, or a (folder, place inside) pair), the data `cache` read-only with each of `hidden` reading
    as an empty file, `readable` paths (the Python environment) read-only and `masked` folders (the project, where
    it lies under a system folder) empty. Paths are absolute; each keeps its place inside unless paired."""
    # --cap-drop ALL: started by root, bwrap would leave train.py the capabilities to unmount what hides the
    # validation split or remount the cache writable
    args = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--proc", "/proc",
            "--dev", "/dev", "--tmpfs", "/tmp"]
    for path in SYSTEM_DIRS:
        _bind_dir(args, "--ro-bind", path)
    for path in masked:
        args += ["--tmpfs", path]
    for pattern in GPU_DEVICES:
        for path in sorted(glob.glob(pattern)):
            args += ["--dev-bind", path, path]
    for path in sorted({os.path.realpath(p) for p in readable} | set(readable)):
        if os.path.exists(path) and not os.path.islink(path):
            args += ["--ro-bind", path, path]
    args += ["--ro-bind", tree, tree]
    if os.path.isdir(cache):
        args += ["--ro-bind", cache, cache]
    for path in hidden:
        if os.path.exists(path):
            args += ["--ro-bind", "/dev/null", path]
    for path in [scratch, *writable]:
        source, place = path if isinstance(path, tuple) else (path, path)
        os.makedirs(source, exist_ok=True)
        args += ["--bind", source, place]
    return args + ["--chdir", tree, "--", *argv]


def python_paths():
    """What the interpreter needs to start: its environment (a venv) and the installation under it."""
    return [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))]
