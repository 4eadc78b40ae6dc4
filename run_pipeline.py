"""Run the pipeline's stages in order, each as its own process.

With no arguments: renders scikit-learn's digits as an image folder (once, into .cache/demo/),
then runs every stage on it with configs/demo.yaml on the CPU (or the GPU when there is one),
and prints the test metrics and the path of the report. A new run given without -c starts from
configs/default.yaml (and says so); an existing run (--run DIR) keeps its own configuration.
Every key, its default and its meaning: configs/default.yaml.

Usage:
    python run_pipeline.py                                   # the demo
    python run_pipeline.py -c configs/plankton_cpu.yaml --run runs/first data.root=/my/images   # a laptop
    python run_pipeline.py -c configs/default.yaml --run runs/dyb data.root=/data/DYB
    python run_pipeline.py -c configs/default.yaml --run runs/dyb --from 4 --to 7 extract.checkpoint=last

Each stage skips itself when it is up to date; --force is passed on to every stage run.
Exit code: that of the first stage that fails (0 when all succeed); 130 on Ctrl-C (the running
stage saves its state as it does alone: rerun the same command to continue).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.config.load import load_config
from common.config.secrets import secret_args
from common.errors import UserError
from common.pipeline.cli import ArgParser
from common.pipeline.spec import script_for
from common.stages import STAGES

ROOT = Path(__file__).resolve().parent

DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
DEMO_DATA = ROOT / ".cache" / "demo" / "digits"


def parse(argv: list[str]) -> argparse.Namespace:
    first, _, rest = __doc__.strip().partition("\n")
    p = ArgParser(description=first, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest.strip())
    p.hidden = secret_args(argv)
    p.add_argument("-c", "--config", action="append", default=[], help="configuration file (repeatable)")
    p.add_argument("--run", default=None, help="run directory")
    p.add_argument("--from", dest="start", type=int, default=1, help="first stage number (1-7)")
    p.add_argument("--to", dest="stop", type=int, default=len(STAGES), help="last stage number (1-7)")
    p.add_argument("--force", action="store_true", help="rerun stages even when up to date")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    a = p.parse_args(argv)
    if not 1 <= a.start <= a.stop <= len(STAGES):
        p.error(f"--from/--to must satisfy 1 <= from <= to <= {len(STAGES)}")
    return a


def _summary(run_dir: Path, ran: bool) -> None:
    """Print the test metrics of stage 07 when this call ran it or it is up to date."""
    from common.evaluate.metrics import with_ci
    from common.pipeline.freshness import Freshness
    from common.pipeline.runconfig import read_run_config
    from common.pipeline.spec import rerun_hint
    from common.stages import SPECS

    cfg = load_config(base=read_run_config(run_dir) or {})
    fresh = Freshness(run_dir, cfg, SPECS, lambda s: rerun_hint(s, run_dir))
    why = fresh.problem("07_inference")
    if why is not None:
        if not ran:
            print(f"\nNo test metrics: {pending_hint(run_dir, [s for s in STAGES if fresh.problem(s)], why)}")
        return
    metrics = json.loads((run_dir / "07_inference" / "manifest.json").read_text()).get("metrics", {})
    print("\nTest metrics (95% intervals in brackets):")
    for k, v in metrics.items():
        if k == "report" or k.endswith("_ci95") or k.endswith("_uninformative") or not isinstance(v, (int, float, str)):
            continue
        text = with_ci(v, metrics.get(f"{k}_ci95")) if isinstance(v, float) else str(v)
        if metrics.get(f"{k.removesuffix('_accuracy')}_uninformative"):
            text += "  (k is at least half the classes: says little)"
        print(f"  {k:>24}: {text}")
    report = run_dir / "07_inference" / "report.html"
    if report.is_file():
        print(f"\nReport: {report.resolve()}")


def pending_hint(run_dir: Path, pending: list[str], why: str) -> str:
    """Why there are no test metrics: one stage's own reason, or for several stages to run the
    command that runs them all (a single stage's script would refuse, its upstream missing)."""
    if len(pending) <= 1:
        return why
    cmd = shlex.join(["python", "run_pipeline.py", "--run", str(run_dir)])
    return f"{len(pending)} stages have not run or are out of date ({', '.join(pending)}): run `{cmd}`"


def start_configs(configs: list[str], overrides: list[str], run: str | None) -> tuple[list[str], list[str], str]:
    """The -c files and overrides of a command, and one line saying where its settings come from.

    The demo (digits, ``configs/demo.yaml``, its data root) only with no ``-c``, no ``--run`` and no
    ``data.root``: a new run of the user's own (``--run`` or ``data.root`` given) starts from
    ``configs/default.yaml``; an existing run keeps its own ``config.yaml`` (empty line)."""
    if configs or (run is not None and (Path(run) / "config.yaml").is_file()):
        return configs, overrides, ""
    if run is None and not any(o.startswith("data.root=") for o in overrides):
        from common.data.demo import render_digits

        print(f"Demo: scikit-learn digits rendered into {DEMO_DATA} (once)", flush=True)
        root = render_digits(DEMO_DATA)
        return [str(DEMO_CONFIG)], [f"data.root={root}", *overrides], f"configuration: {DEMO_CONFIG.name} (the demo)"
    rel = DEFAULT_CONFIG.relative_to(ROOT)
    return [str(DEFAULT_CONFIG)], overrides, (f"configuration: {rel} (no -c given; a first run on a laptop: "
                                               f"-c configs/plankton_cpu.yaml)")


def run_stage(cmd: list[str]) -> tuple[int, bool]:
    """Run one stage and wait for it, however it ends: (its exit code, whether we were interrupted).

    A SIGINT or SIGTERM is passed on to the stage, which saves its state (stage 03: last.pt) and
    exits 130; this process notes it and keeps waiting, where ``subprocess.call`` would kill the
    stage mid-save. Passed on because it may have been sent to this process alone (``kill -INT``, a
    scheduler): the stage then kept running to its end. A Ctrl-C at the terminal reaches the stage
    directly too (same process group); the stage takes the second copy as the same stop.
    """
    interrupted = False
    procs: list[subprocess.Popen] = []

    def note(signum: int, frame: object) -> None:  # noqa: ARG001 - signal handler signature
        nonlocal interrupted
        interrupted = True
        if procs:
            with contextlib.suppress(ProcessLookupError):
                procs[0].send_signal(signum)

    old = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if interrupted:  # a signal in the instant before the stage starts
            return 130, True
        procs.append(subprocess.Popen(cmd))
        rc = procs[0].wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return rc, interrupted


def main(argv: list[str] | None = None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    configs, overrides, said = start_configs(a.config, list(a.overrides), a.run)
    if said:
        print(said, flush=True)
    common_args = [x for c in configs for x in ("-c", c)]
    if a.run:
        common_args += ["--run", a.run]
    if a.force:
        common_args.append("--force")
    run_dir = Path(a.run) if a.run else None
    if run_dir is None:
        try:
            run_dir = Path(load_config(configs, overrides).run.dir)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    t0 = time.time()
    for i in range(a.start, a.stop + 1):
        name = STAGES[i - 1]
        script = ROOT / script_for(name)
        if not script.is_file():
            print(f"error: {script} is missing: the checkout is incomplete (git status; git checkout -- "
                  f"{script.name})", file=sys.stderr)
            return 2
        print(f"\n[{i}/7] {name}", flush=True)
        t = time.time()
        rc, interrupted = run_stage([sys.executable, str(script), *common_args, *overrides])
        if interrupted or rc in (130, -signal.SIGINT, -signal.SIGTERM):
            print(f"\n{name} interrupted (exit code 130): rerun the same command to continue", file=sys.stderr)
            return 130
        if rc != 0:
            log_txt = run_dir / name / "log.txt"
            where = f"; see {log_txt}" if rc != 2 and log_txt.is_file() else ""
            print(f"\n{name} stopped with exit code {rc}{where}", file=sys.stderr)
            return rc
        print(f"[{i}/7] {name}: done in {time.time() - t:.1f} s", flush=True)
    print(f"\nPipeline finished in {time.time() - t0:.1f} s; run folder {run_dir.resolve()}")
    _summary(run_dir, ran=a.stop == len(STAGES))
    return 0


def _main() -> int:
    """``main`` with Ctrl-C outside a stage (the demo's rendering, between stages) as exit 130, one line."""
    try:
        return main()
    except KeyboardInterrupt:
        print("\ninterrupted (exit code 130): rerun the same command to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(_main())
