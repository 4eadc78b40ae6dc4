"""The wrapper every stage runs in: command line, run configuration, checks, lock, manifest, exit codes.

A stage script calls ``stages.run("04_extract_features")``, which calls ``execute`` with the
stage's spec and the stage table. The wrapper, in order:

1. parses ``-c`` (repeatable), ``--run``, ``--force`` and ``section.key=value`` overrides, in
   any order, and resolves the configuration: defaults, the run's own ``RUN/config.yaml``, the
   ``-c`` files, the overrides (so ``--run RUN`` alone reruns with the run's configuration);
2. checks, touching no file: every upstream stage finished, is unchanged and is not running;
   no other process runs this stage; whether this stage is up to date (exit 0, "up to date") or
   why it reruns (one line: the key, the output or the upstream that changed);
3. the check phase, still touching no file: the wrapper's own checks (``log.txt`` is not a
   link) and the driver's ``check(ctx)`` when it has one (inputs, upstream files it will read,
   names, store ownership, planted files; what it finds goes to ``ctx.checked`` for ``main``);
4. takes the stage's lock, saves ``RUN/config.yaml`` when the command changed it (saying which
   keys changed and which stages that makes out of date), removes temporaries a killed run left,
   removes the old manifest, writes the stage's ``config.yaml`` and starts ``log.txt``;
5. calls the stage's ``main(ctx)`` with a configuration that records the keys it reads;
6. writes ``manifest.json`` last (its presence means the stage finished);
7. e-mails per the ``notify`` section and exits 0 (done), 2 (bad input or configuration: one
   line, no traceback), 1 (unexpected: traceback in ``log.txt``) or 130 (interrupted).

A refusal in steps 1-3 leaves the run folder byte for byte as it was. A refusal found while
``main`` runs (a file that goes bad while it is read) is rolled back when ``main`` changed nothing
in the stage's folder and the last finished run's outputs are unchanged (``_roll_back``): the
manifest, the stage's ``config.yaml`` and ``RUN/config.yaml`` get their old bytes back, and a
folder the command created is removed, so only ``log.txt`` differs. Otherwise the stage is in the
ordinary unfinished state (rerun to continue), and its one error line says so.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..config.secrets import to_yaml
from ..config.values import recording
from ..errors import UserError
from ..fileio import atomic_open
from ..runtime.distributed import _go_no_go, _init_distributed
from ..runtime.signals import _install_signals, _restore_signals
from .checks import _check_stage_folder, _checks, _config_change_message
from .cli import parse_args
from .context import Context
from .folders import as_user_error, check_stage_folder, check_writable, remove_stale_temporaries
from .lock import StageLock
from .logs import setup_logging, start_log_file
from .manifest import MANIFEST, _manifest, _now, changed_outputs, write_manifest
from .notify import _send_email
from .rollback import _Before, _remove_created, _roll_back
from .runconfig import write_run_config

if TYPE_CHECKING:
    from .cli import Invocation
    from .logs import _Buffer
    from .spec import StageSpec

log = logging.getLogger(__name__)


def _begin(inv: Invocation, specs: dict[str, StageSpec], stage_dir: Path, buffer: _Buffer,
           handlers: list[logging.Handler], slog: logging.Logger) -> None:
    """The checks passed and the stage holds its lock (rank 0): run config, clean-up, config.yaml, log.txt."""
    if inv.changes:
        slog.info("%s", _config_change_message(inv, specs))
    if inv.changes or inv.new_run:
        write_run_config(inv.run_dir, inv.cfg)
    for p in remove_stale_temporaries(stage_dir):
        slog.info("removed %s (a temporary file left by a killed run)", p)
    (stage_dir / MANIFEST).unlink(missing_ok=True)  # from here on the stage is unfinished
    with atomic_open(stage_dir / "config.yaml") as fh:
        fh.write(to_yaml(inv.cfg))
    start_log_file(stage_dir, buffer, handlers)


def _failure(e: BaseException, spec: StageSpec, stage_dir: Path, slog: logging.Logger,
             unfinished: bool = False) -> tuple[int, str, str | None]:
    """(exit code, one line, traceback or None) of a stage that stopped, logged. ``unfinished``: a
    refusal after the stage had started writing (its line says so)."""
    if isinstance(e, UserError):
        line = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        if line.startswith("Caught "):  # re-raised by a DataLoader worker: the file is on the last line
            from ..data.datasets import loader_error_line

            line = loader_error_line(e)
        if unfinished:
            line += f" ({spec.name} had started writing: it is unfinished now; rerun it once this is fixed)"
        slog.error("%s", line)  # the console and log.txt already say ERROR
        return 2, line, None
    if isinstance(e, KeyboardInterrupt):
        line = f"interrupted ({e})" if str(e) else "interrupted (Ctrl-C)"
        slog.warning("%s; rerun the same command to continue", line)
        return 130, line, None
    line = f"{e.__class__.__name__}: {e}".splitlines()[0]
    slog.error("%s failed: %s (traceback in %s)", spec.name, line, stage_dir / "log.txt", exc_info=e)
    return 1, line, "".join(traceback.format_exception(e))


def _close(handlers: list[logging.Handler], lock: StageLock, world: int) -> None:
    lock.release()
    if world > 1:
        with contextlib.suppress(Exception):  # closing must not hide the stage's outcome
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    for h in handlers:
        logging.getLogger().removeHandler(h)
        h.close()


def parse(spec: StageSpec, argv: list[str], doc: str | None) -> Invocation | None:
    """Step 1: the command line and the configuration; None (its one line printed) when refused."""
    try:
        return parse_args(spec, argv, doc)
    except UserError as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else e.__class__.__name__}", file=sys.stderr)
        return None


class _Run:
    """One stage run: what outlives a phase of ``execute`` (logging, signals, the lock, what was
    read before the first write) and its outcome (``code``). Creating it writes nothing."""

    def __init__(self, spec: StageSpec, inv: Invocation, table: dict[str, StageSpec], argv: list[str]):
        self.spec, self.inv, self.table, self.argv = spec, inv, table, argv
        self.cfg, self.run_dir = inv.cfg, inv.run_dir
        self.stage_dir = spec.folder(self.run_dir, self.cfg)
        self.rank0 = int(os.environ.get("RANK", "0")) == 0
        self.handlers, self.buffer = setup_logging(self.cfg.run.log_level, self.rank0)
        self.old_signals = _install_signals()
        self.t0, self.started = time.time(), _now()
        self.slog = logging.getLogger(spec.name)
        self.metrics: dict | None = None
        self.code, self.err_line, self.tb_text, self.quiet = 1, None, None, False  # quiet: up to date, no e-mail
        self.lock = StageLock(self.stage_dir, spec.name, self.run_dir)
        self.rank, self.world = 0, int(os.environ.get("WORLD_SIZE", "1"))
        self.old: dict | None = None
        self.before: _Before | None = None  # set once the stage may write (rank 0)
        self.rolled_back = False

    def run_checks(self) -> tuple[Any, str | None]:
        """Step 2, touching no file: the stage's folder, the process group, then upstream, lock and
        freshness on every rank; returns the freshness record and why the stage runs (None: up to date)."""
        check_stage_folder(self.stage_dir, self.run_dir, self.spec.name)  # no configured name leads out of the stage's folder
        # every rank must hear of a refusal on one (rank 0's lock check): the group first, then the checks
        self.rank, self.world = _init_distributed(self.cfg.run.device)
        with _go_no_go(self.world):
            fresh, self.old, why = _checks(self.spec, self.inv, self.table, self.stage_dir, self.rank0)
        return fresh, why

    def up_to_date(self) -> None:
        """Nothing to run: say so (and save a changed run configuration); no e-mail."""
        inv = self.inv
        if inv.changes:
            self.slog.info("%s", _config_change_message(inv, self.table))
        if self.rank0 and (inv.changes or inv.new_run):
            write_run_config(self.run_dir, self.cfg)
        self.slog.info("%s is up to date (inputs and configuration unchanged since %s); use --force to rerun",
                       self.spec.name, self.old.get("finished") if self.old else "?")
        self.code, self.quiet = 0, True

    def context(self, fresh: Any) -> tuple[Context, Any]:
        """The driver's ``Context``, with a configuration that records the keys it reads (and that record)."""
        rec_cfg, reads = recording(self.cfg)
        old = self.old
        ctx = Context(name=self.spec.name, cfg=rec_cfg, run_dir=self.run_dir, dir=self.stage_dir, freshness=fresh,
                      upstream_names=self.spec.upstream(self.cfg), force=self.inv.force, previous=old,
                      changed_output=changed_outputs(self.stage_dir, old) if old else None, rank=self.rank,
                      world_size=self.world)
        return ctx, reads

    def check_and_begin(self, ctx: Context) -> None:
        """Steps 3 and 4 under one go/no-go: the check phase (still read only: the wrapper's own, then
        the driver's, then rank 0's writability), then rank 0 takes the lock and begins writing."""
        with _go_no_go(self.world):  # a refusal on one rank (the lock, a driver's check) stops every rank
            _check_stage_folder(self.stage_dir)
            check_fn = self.spec.check()
            if check_fn is not None:
                check_fn(ctx)
            if self.rank == 0:
                check_writable(self.run_dir, self.stage_dir)  # one line, before the first write
                self.begin()

    def begin(self) -> None:
        """Rank 0: what rollback needs is read, the lock taken, then the first writes (``_begin``)."""
        taken = _Before.take(self.inv, self.stage_dir)  # read before the first write
        self.lock.acquire()
        self.before = taken
        _begin(self.inv, self.table, self.stage_dir, self.buffer, self.handlers, self.slog)

    def run_driver(self, ctx: Context, why: str) -> None:
        """Step 5: seed, wait for every rank, then the driver's ``main(ctx)`` (its metrics kept)."""
        self.slog.info("run folder %s; runs because %s", self.run_dir, why)  # the logger is the stage: named once
        from ..runtime.seed import seed_everything

        seed_everything(self.cfg.run.seed)
        if self.world > 1:  # torch is imported by a stage that runs, never by one that is up to date
            from ..runtime.distributed import barrier

            barrier()
        if "search.precision" in self.spec.keys:  # the exact searches' speed knob, process-wide (logged at the first)
            from ..retrieval.search import set_precision

            set_precision(ctx.cfg.search.precision)
        with _go_no_go(self.world):  # a rank that fails stops the others, which would wait for it at the end
            self.metrics = self.spec.main()(ctx) or {}

    def record(self, ctx: Context, reads: Any) -> None:
        """Step 6 (rank 0): ``manifest.json``, written last."""
        if self.rank != 0:
            return
        spec = self.spec
        manifest = _manifest(spec, self.inv, ctx, reads, self.argv, self.started, self.t0, self.metrics)
        if manifest["undeclared_keys_read"]:
            self.slog.error("internal: %s read configuration keys it does not declare: %s", spec.name,
                            ", ".join(manifest["undeclared_keys_read"]))
        write_manifest(self.stage_dir, manifest)
        self.slog.info("%s finished in %.1f s", spec.name, time.time() - self.t0)

    def fail(self, e: BaseException) -> None:
        """The stage stopped: its exit code and line; a refusal after the first write is rolled back
        when it can be (``_roll_back``)."""
        e = as_user_error(e, self.run_dir)  # a permission error inside the run folder: one line, exit 2
        refused_mid_run = isinstance(e, UserError) and self.before is not None
        if refused_mid_run:
            self.rolled_back = _roll_back(self.before, self.inv, self.stage_dir, self.old)
        self.code, self.err_line, self.tb_text = _failure(e, self.spec, self.stage_dir, self.slog,
                                                          unfinished=refused_mid_run and not self.rolled_back)

    def finish(self) -> None:
        """Step 7, whatever happened: e-mail, lock and log released, a rolled-back run's new folders
        removed, the signal handlers restored. A signal here keeps the decided outcome."""
        try:
            if not self.quiet and self.rank0:
                code = self.code
                _send_email(self.cfg, {0: "success", 130: "interrupt"}.get(code, "failure"), {
                    "stage": self.spec.name, "run_dir": str(self.run_dir), "host": socket.gethostname(),
                    "elapsed_s": time.time() - self.t0, "error": self.err_line, "traceback": self.tb_text,
                    "log_path": str(self.stage_dir / "log.txt"), "exit_code": code, "metrics": self.metrics,
                })
            _close(self.handlers, self.lock, self.world)
            if self.rolled_back and self.before is not None:
                _remove_created(self.before, self.stage_dir)
        except KeyboardInterrupt:  # a signal during the clean-up: the outcome is already decided
            self.code = 130 if self.code == 0 else self.code
        finally:
            _restore_signals(self.old_signals)


def execute(spec: StageSpec | str, argv: Sequence[str] | None = None, *, table: dict[str, StageSpec],
            doc: str | None = None) -> int:
    """Run one stage (a spec, or its name in ``table``) and return its exit code. ``table``: the
    stage table its upstream stages and the stages a configuration change affects are looked up
    in (``stages.run`` passes ``stages.SPECS`` and exits with the code).

    Every refusal happens before the first write (``check_and_begin`` writes only after the check
    phase passed on every rank); a refusal after it is rolled back (``_Run.fail``)."""
    spec = table[spec] if isinstance(spec, str) else spec
    argv = sys.argv[1:] if argv is None else list(argv)
    inv = parse(spec, argv, doc)
    if inv is None:
        return 2
    run = _Run(spec, inv, table, argv)
    try:
        fresh, why = run.run_checks()  # nothing is written before
        if why is None:
            run.up_to_date()
            return 0  # (a signal during the clean-up does not change it)
        ctx, reads = run.context(fresh)
        run.check_and_begin(ctx)
        run.run_driver(ctx, why)
        run.record(ctx, reads)
        run.code = 0
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - every outcome gets its exit code
        run.fail(e)
    finally:
        run.finish()
    return run.code
