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
from typing import TYPE_CHECKING, Sequence

from ..config.secrets import to_yaml
from ..config.values import recording
from ..errors import UserError
from ..fileio import atomic_open
from .folders import as_user_error, check_stage_folder, check_writable, remove_stale_temporaries
from .lock import StageLock
from .manifest import MANIFEST, changed_outputs, write_manifest
from .runconfig import write_run_config

if TYPE_CHECKING:
    from .spec import StageSpec
from ..runtime.distributed import _go_no_go, _init_distributed
from ..runtime.signals import _install_signals, _restore_signals
from .checks import _check_stage_folder, _checks, _config_change_message
from .cli import parse_args
from .context import Context
from .logs import setup_logging, start_log_file
from .manifest import _manifest, _now
from .notify import _send_email
from .rollback import _Before, _remove_created, _roll_back

if TYPE_CHECKING:
    from .cli import Invocation
    from .logs import _Buffer

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


def execute(spec: StageSpec | str, argv: Sequence[str] | None = None, *, table: dict[str, StageSpec],
            doc: str | None = None) -> int:
    """Run one stage (a spec, or its name in ``table``) and return its exit code. ``table``: the
    stage table its upstream stages and the stages a configuration change affects are looked up
    in (``stages.run`` passes ``stages.SPECS`` and exits with the code)."""
    spec = table[spec] if isinstance(spec, str) else spec
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        inv = parse_args(spec, argv, doc)
    except UserError as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else e.__class__.__name__}", file=sys.stderr)
        return 2
    cfg, run_dir = inv.cfg, inv.run_dir
    stage_dir = spec.folder(run_dir, cfg)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    handlers, buffer = setup_logging(cfg.run.log_level, rank0)
    old_signals = _install_signals()
    t0, started = time.time(), _now()
    slog = logging.getLogger(spec.name)
    metrics: dict | None = None
    code, err_line, tb_text, quiet = 1, None, None, False  # quiet: up to date, no e-mail
    lock = StageLock(stage_dir, spec.name, run_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    old: dict | None = None
    before: _Before | None = None  # set once the stage may write (rank 0)
    rolled_back = False
    try:
        check_stage_folder(stage_dir, run_dir, spec.name)  # no configured name leads out of the stage's folder
        # every rank must hear of a refusal on one (rank 0's lock check): the group first, then the checks
        rank, world = _init_distributed(cfg.run.device)
        with _go_no_go(world):
            fresh, old, why = _checks(spec, inv, table, stage_dir, rank0)  # nothing is written before
        if why is None:
            if inv.changes:
                slog.info("%s", _config_change_message(inv, table))
            if rank0 and (inv.changes or inv.new_run):
                write_run_config(run_dir, cfg)
            slog.info("%s is up to date (inputs and configuration unchanged since %s); use --force to rerun",
                      spec.name, old.get("finished") if old else "?")
            code, quiet = 0, True
            return 0
        rec_cfg, reads = recording(cfg)
        ctx = Context(name=spec.name, cfg=rec_cfg, run_dir=run_dir, dir=stage_dir, freshness=fresh,
                      upstream_names=spec.upstream(cfg), force=inv.force, previous=old,
                      changed_output=changed_outputs(stage_dir, old) if old else None, rank=rank,
                      world_size=world)
        with _go_no_go(world):  # a refusal on one rank (the lock, a driver's check) stops every rank
            # the check phase, still read only: the wrapper's own, then the driver's
            _check_stage_folder(stage_dir)
            check_fn = spec.check()
            if check_fn is not None:
                check_fn(ctx)
            if rank == 0:
                check_writable(run_dir, stage_dir)  # one line, before the first write
                taken = _Before.take(inv, stage_dir)  # read before the first write
                lock.acquire()
                before = taken
                _begin(inv, table, stage_dir, buffer, handlers, slog)
        slog.info("run folder %s; runs because %s", run_dir, why)  # the logger is the stage: named once
        from ..runtime.seed import seed_everything

        seed_everything(cfg.run.seed)
        if world > 1:  # torch is imported by a stage that runs, never by one that is up to date
            from ..runtime.distributed import barrier

            barrier()
        with _go_no_go(world):  # a rank that fails stops the others, which would wait for it at the end
            metrics = spec.main()(ctx) or {}
        if rank == 0:
            manifest = _manifest(spec, inv, ctx, reads, argv, started, t0, metrics)
            if manifest["undeclared_keys_read"]:
                slog.error("internal: %s read configuration keys it does not declare: %s", spec.name,
                           ", ".join(manifest["undeclared_keys_read"]))
            write_manifest(stage_dir, manifest)
            slog.info("%s finished in %.1f s", spec.name, time.time() - t0)
        code = 0
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - every outcome gets its exit code
        e = as_user_error(e, run_dir)  # a permission error inside the run folder: one line, exit 2
        refused_mid_run = isinstance(e, UserError) and before is not None
        if refused_mid_run:
            rolled_back = _roll_back(before, inv, stage_dir, old)
        code, err_line, tb_text = _failure(e, spec, stage_dir, slog, unfinished=refused_mid_run and not rolled_back)
    finally:
        try:
            if not quiet and rank0:
                _send_email(cfg, {0: "success", 130: "interrupt"}.get(code, "failure"), {
                    "stage": spec.name, "run_dir": str(run_dir), "host": socket.gethostname(),
                    "elapsed_s": time.time() - t0, "error": err_line, "traceback": tb_text,
                    "log_path": str(stage_dir / "log.txt"), "exit_code": code, "metrics": metrics,
                })
            _close(handlers, lock, world)
            if rolled_back and before is not None:
                _remove_created(before, stage_dir)
        except KeyboardInterrupt:  # a signal during the clean-up: the outcome is already decided
            code = 130 if code == 0 else code
        finally:
            _restore_signals(old_signals)
    return code
