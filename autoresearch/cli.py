"""
The `autoresearch` command: run | noise | status | plot | rebuild-tsv, and parallel mode: submit | wait | serve |
stop, and the headless driver: agent. `autoresearch <command> --help` says more.
"""

import argparse
import os
import sys

from autoresearch import experiment, gate, gitops, ledger, serve
from autoresearch.common import (CONFIRM_SEEDS, DEFAULT_BUDGET, DEFAULT_SEED, EXIT_CRASH, EXIT_OK, EXIT_REFUSED,
                                 NOISE_RUNS, Options, Refusal, env_number, number, quiet_stdout)
from autoresearch.ledger import LedgerError

DESCRIPTION = """\
Experiment harness for autoresearch: one safe command per experiment.

The loop: edit train.py, then `uv run autoresearch run -m "what I tried"`, then read the verdict.
State lives in .autoresearch/ (ledger.jsonl, noise.json, lock) and results.tsv, run.log, progress.png,
all git-ignored; git keeps a copy of the ledger (refs/autoresearch/ledger) that a lost or edited ledger.jsonl is
rebuilt from. Exit codes: 0 done (keep, discard or remeasure), 1 crash, 2 refused (nothing changed), 130/143
interrupted.
"""

RUN_HELP = f"""\
Commit train.py (if it changed), run it with a hard timeout, record the result, keep or revert.

Refuses (exit 2, nothing changed) outside a git repository, off an autoresearch/<tag> branch, with uncommitted
changes to any file but train.py, with a damaged results.tsv/ledger, while another autoresearch command runs in
this repository, with a bad setting (flag or environment variable), with other settings than the best kept run
(budget, corpus, evaluation size, device: start a new branch for those), or when this exact train.py was already
run on this branch (unless --rerun, which adds a run with a new seed to its pool).

--rerun of a kept train.py is a measurement, not an experiment: verdict `remeasure`, nothing changes in git, no
row of its own in results.tsv (the kept row shows the new pooled mean), not counted in status or the keep rate.
If the pooled mean no longer clears the bar the commit was kept on (against the best kept commit before it, by
the same rule, --simpler included), the verdict says so and prints the command that goes back to the better one.

Keep gate: the first successful run on a branch is the baseline. Every value is a pooled mean: all valid runs of
one train.py content, one per seed. A candidate (mean of n runs) is kept only if, against the best kept (mean of
n_best runs), with bar = margin * sqrt((1/n + 1/n_best) / 2):
    best_kept - mean > 2 * bar                            (clear win), or
    bar < gain <= 2 * bar and, after --confirm extra seeds join its pool, the gain still exceeds the new bar
with margin = max({gate.NOISE_MULT:g} * noise_std, {gate.MARGIN_FLOOR:g}) from `autoresearch noise`, and
{gate.DEFAULT_MARGIN:g} until noise has been measured.
On discard or crash only train.py is reset to the last kept commit (the branch moves back; other files are
never touched); a train.py edited while the run went is left as it is. Ctrl-C / SIGTERM stops train.py and
undoes the candidate commit, leaving your edit in place.

Prints a live progress line, the log tail on a crash, and a final block: verdict (keep|discard|crash|interrupted,
or remeasure),
reason, val_bpb, best_before, throughput (steps, tok/s, start-up), commit, wall_seconds, and warnings when tok/s
moved more than 15 % from the noise runs' or start-up is far above the baseline's. docs/faults.md lists the faults.
"""

NOISE_HELP = """\
Run the committed train.py N times with seeds it has not run with yet and store the spread of val_bpb (sample
standard deviation over all valid runs of this exact train.py, one per seed, the baseline run included) and their
tok/s in .autoresearch/noise.json. From then on the keep margin is max(2 x noise_std, 0.001). Run it once right
after the baseline, and again when a verdict warns that tok/s moved (other load on the machine) or after a keep
that changes the model's speed. Costs N full runs.
"""

class Parser(argparse.ArgumentParser):
    """Bad arguments: one line and exit 2, like every other refusal (the subcommands' parsers are this class too)."""

    def error(self, message):
        self.exit(EXIT_REFUSED, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def checked(integer=False, low=0.0, low_ok=False):
    """An argparse type: number() with its message as argparse's error."""
    def parse(text):
        try:
            return number("the value", text, integer=integer, low=low, low_ok=low_ok)
        except Refusal as e:
            raise argparse.ArgumentTypeError(str(e).replace("the value ", "")) from None
    return parse


def _add_run_options(p):
    p.add_argument("--seed", type=checked(integer=True, low_ok=True), default=DEFAULT_SEED,
                   help="AUTORESEARCH_SEED for train.py (default %(default)s; a seed this train.py already ran with "
                        "is skipped for the next one)")
    p.add_argument("--budget", type=checked(), default=None,
                   help="training seconds, passed as AUTORESEARCH_TIME_BUDGET (default: that variable, else 300)")
    p.add_argument("--timeout", type=checked(), default=None,
                   help="hard wall-clock limit per train.py run in seconds; the whole process group is killed "
                        "(default: $AUTORESEARCH_TIMEOUT, else budget + max(300, budget), i.e. 600 for 300)")


def run_options(args):
    """Options for run / noise / submit, every setting checked (flags, then the environment) before anything runs."""
    budget = args.budget if args.budget is not None else env_number("AUTORESEARCH_TIME_BUDGET", DEFAULT_BUDGET)
    timeout = args.timeout if args.timeout is not None else env_number("AUTORESEARCH_TIMEOUT", None)
    if timeout is not None and timeout <= budget:
        raise Refusal(f"the timeout ({timeout:g} s) must be longer than the training budget ({budget:g} s), or every "
                      "run is killed: raise --timeout / AUTORESEARCH_TIMEOUT, or leave it unset")
    env_number("AUTORESEARCH_EVAL_TOKENS", None, integer=True)  # train.py reads it: refuse now, not after a crash
    return Options(seed=args.seed, budget=budget, timeout=timeout)


def cluster_options(args):
    workers = args.workers if args.workers is not None else env_number("AUTORESEARCH_WORKERS", None, integer=True)
    return args.address, workers


def _add_detach(p):
    p.add_argument("--detach", action="store_true",
                   help="run in the background and return at once; `autoresearch wait` prints the verdict")


SUBMIT_HELP = """\
Parallel mode (needs Ray: `uv sync --extra parallel`). Snapshot train.py as a candidate commit on top of the
current best (at refs/autoresearch/candidates/<id>; the branch does not move), restore train.py to the best and
return at once with the candidate's id. Same refusals as `run`; a train.py already run or queued is refused
unless --rerun.

A coordinator (`autoresearch serve`, started in the background if none runs) runs queued candidates on one worker
per GPU of the Ray cluster (or --workers CPU workers), with the same budget, timeout and crash handling as `run`,
and judges each against the best kept result when it finishes. A kept candidate becomes the new best: the branch
moves to it, or, if the best moved since it was submitted, to a new commit on top of the new best with the
candidate's train.py (it replaces the file; it is not a merge). A worker that dies mid-run gets its candidate one
retry, then a crash row. `autoresearch wait` prints verdicts, `status` shows the queue and workers.
"""

WAIT_HELP = """\
Block until the next verdict(s) of submitted candidates and print them (each verdict is printed once; Ctrl-C
loses nothing). Starts the coordinator if candidates are queued and none runs (resuming after a crash or a
reboot). Then brings an unedited train.py to the new best.
"""

SERVE_HELP = """\
The coordinator of parallel mode, normally started in the background by submit/wait (log in
.autoresearch/serve.log). Holds the repository lock (so `run` and `noise` wait for it), starts or joins a Ray
cluster, runs the queue (.autoresearch/queue.jsonl) and writes every verdict. Stops after --idle seconds without
work, or on SIGTERM/`autoresearch stop` (running candidates go back to the queue).
"""


def _add_cluster_options(p):
    p.add_argument("--address", default=os.environ.get("AUTORESEARCH_RAY_ADDRESS"),
                   help="Ray cluster to join, e.g. 10.0.0.1:6379 (default: $AUTORESEARCH_RAY_ADDRESS, else "
                        "$RAY_ADDRESS, else a local cluster on this machine)")
    p.add_argument("--workers", type=checked(integer=True), default=None,
                   help="number of workers (default: $AUTORESEARCH_WORKERS, else one per GPU of the cluster, "
                        "else 1 CPU worker)")


def build_parser():
    parser = Parser(prog="autoresearch", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command",
                                metavar="{run,noise,status,plot,rebuild-tsv,submit,wait,serve,stop,agent}")

    for name, summary, text in (("run", "run one experiment: commit, train, judge, keep or revert", RUN_HELP),
                                ("submit", "queue train.py as a candidate for parallel workers, return at once",
                                 SUBMIT_HELP)):
        p = sub.add_parser(name, help=summary, description=text, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("-m", "--message", required=True, help="what you tried (commit message and results.tsv)")
        _add_run_options(p)
        p.add_argument("--confirm", type=checked(integer=True, low_ok=True), default=CONFIRM_SEEDS,
                       help="extra seeds for a borderline candidate (default %(default)s; 0 keeps borderline ones unconfirmed)")
        p.add_argument("--margin", type=checked(low_ok=True), default=None,
                       help="fixed keep margin in val_bpb, instead of the one derived from the noise estimate")
        p.add_argument("--simpler", action="store_true",
                       help="this change simplifies the code: keep it unless it is worse than best by more than the margin")
        p.add_argument("--rerun", action="store_true",
                       help="run this exact train.py again although it was already run: one more run, with a seed "
                            "it has not run with, joins its pool (of a kept train.py: a remeasurement, see above)")
        if name == "submit":
            _add_cluster_options(p)
        else:
            _add_detach(p)

    p = sub.add_parser("noise", help="measure run-to-run noise of val_bpb on the current commit",
                       description=NOISE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--runs", type=checked(integer=True, low=1, low_ok=True), default=NOISE_RUNS,
                   help="runs (default %(default)s)")
    _add_run_options(p)
    _add_detach(p)

    p = sub.add_parser("status", help="best, baseline, noise, keep rate, pace, recent experiments",
                       description="Summary of the current branch's experiments, from the ledger (read-only).")
    p.add_argument("-n", "--last", type=checked(integer=True), default=10, help="how many recent experiments to list (default 10)")
    p.add_argument("--branch", help="another branch than the current one")

    p = sub.add_parser("plot", help="write progress.png", description=(
        "Write progress.png: val_bpb of every experiment, kept ones on the running-best step line with short "
        "labels, discarded ones faint, crashes as red crosses at the top."))
    p.add_argument("-o", "--output", default=None, help="output path (default: progress.png in the repo root)")
    p.add_argument("--branch", help="another branch than the current one")

    sub.add_parser("rebuild-tsv", help="rewrite results.tsv from the ledger", description=(
        "Rewrite results.tsv from .autoresearch/ledger.jsonl (all branches, in run order), e.g. after it was "
        "damaged. The ledger is never modified (a ledger.jsonl unlike git's copy, refs/autoresearch/ledger, is first "
        "rebuilt from it, as by every command)."))

    p = sub.add_parser("wait", help="print the next verdict(s) of submitted candidates", description=WAIT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all", action="store_true", help="wait until the queue is empty, then print every new verdict")
    p.add_argument("--timeout", type=checked(low_ok=True), default=None,
                   help="give up after this many seconds (exit 0)")
    _add_cluster_options(p)

    p = sub.add_parser("serve", help="the parallel-mode coordinator (submit/wait start it for you)",
                       description=SERVE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_cluster_options(p)
    p.add_argument("--idle", type=checked(), default=None,
                   help="stop after this many seconds with an empty queue "
                        f"(default: $AUTORESEARCH_IDLE, else {serve.IDLE_SECONDS:g})")

    sub.add_parser("stop", help="stop the parallel-mode coordinator or a detached run", description=(
        "Stop `autoresearch serve` (SIGTERM): running candidates go back to the queue and run again next time. "
        "A run started with --detach is interrupted instead (like Ctrl-C); `wait` then prints what happened."))

    from autoresearch import agent
    p = sub.add_parser("agent", help="the experiment loop driven by any OpenAI-compatible model, unattended",
                       description=agent.HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    agent.add_arguments(p, checked)
    _add_run_options(p)
    _add_cluster_options(p)
    return parser


def left_out(records):
    """A word on the run records the views leave out for want of a known verdict (status names them)."""
    n = len(gate.unjudged(records))
    return f" ({n} run record(s) with no known verdict left out: see `autoresearch status`)" if n else ""


def main(argv=None):
    try:
        return command(argv)
    except BrokenPipeError:  # piped into `head`, which has read what it wanted: stop without a traceback
        quiet_stdout()
        return EXIT_CRASH


def command(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_REFUSED
    try:
        if getattr(args, "detach", False):
            from autoresearch import detach
            raw = list(sys.argv[1:] if argv is None else argv)
            return detach.start([a for a in raw if a != "--detach"])
        if args.command in ("wait", "stop"):
            from autoresearch import detach
            root = gitops.repo_root()
            if args.command == "wait" and detach.current(root):
                return detach.wait(root, args.timeout)
            if args.command == "wait" and detach.nothing_to_wait_for(root):
                return EXIT_OK
            if args.command == "stop" and detach.stop(root):
                return EXIT_OK
        if args.command == "agent":
            from autoresearch import agent
            return agent.run_agent(agent.from_args(args, run_options(args), *cluster_options(args)))
        if args.command in ("wait", "serve", "stop"):
            from autoresearch import parallel
            if args.command == "wait":
                return parallel.wait(args.all, args.timeout, *cluster_options(args))
            if args.command == "stop":
                return parallel.stop()
            idle = args.idle if args.idle is not None else env_number("AUTORESEARCH_IDLE", serve.IDLE_SECONDS)
            return serve.serve(gitops.repo_root(), *cluster_options(args), idle)
        if args.command in ("run", "noise", "submit"):
            opts = run_options(args)
            if args.command in ("run", "submit"):
                if not args.message.strip():
                    raise Refusal("-m needs a short description of what you tried")
                opts.description, opts.confirm, opts.margin = args.message.strip(), args.confirm, args.margin
                opts.simpler, opts.rerun = args.simpler, args.rerun
                if args.command == "submit":
                    from autoresearch import parallel
                    return parallel.submit(opts, *cluster_options(args))
                return experiment.run_experiment(opts)
            opts.runs = args.runs
            return experiment.run_noise(opts)
        root = gitops.repo_root()
        if args.command == "rebuild-tsv":
            n = ledger.write_results(root)
            print(f"wrote {ledger.RESULTS_FILE} with {n} experiments{left_out(ledger.read_ledger(root))}")
            return EXIT_OK
        branch = args.branch or gitops.current_branch(root) or "HEAD"
        if args.command == "status":
            from autoresearch import status
            print(status.render(root, branch, args.last))
            return EXIT_OK
        if args.command == "plot":
            from autoresearch import plot  # matplotlib only when asked for
            records = gate.branch_records(ledger.read_ledger(root), branch)
            margin = gate.margin(ledger.read_noise(root, branch))[0]
            # kept commits a reset took out of this history are not kept any more
            in_history = gitops.history(root, args.branch or "HEAD")
            path = args.output or os.path.join(root, plot.PLOT_FILE)
            try:
                plot.make_plot(records, path, title=branch, margin=margin, in_history=in_history)
            except OSError as e:
                why = ("a file is where a folder should be" if isinstance(e, (FileExistsError, NotADirectoryError))
                       else e.strerror or str(e))
                raise Refusal(f"cannot write {path}: {why} ({e.filename}); choose another path with -o") from None
            print(f"wrote {path}{left_out(records)}")
            return EXIT_OK
    except (Refusal, LedgerError) as e:
        print(f"autoresearch: {e}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
