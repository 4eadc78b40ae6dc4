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

import argparse
import contextlib
import datetime as dt
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import traceback
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from . import config as config_mod
from . import runfolder as rf
from .errors import StaleUpstreamError, UserError
from .signals import interrupt

if TYPE_CHECKING:
    from .stages import StageSpec

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


def script_for(stage_name: str) -> str:
    """The script that produces a stage, e.g. ``03_main_supcon.py``."""
    return f"{stage_name}.py"


# ----------------------------------------------------------------------------- context


@dataclass
class Context:
    """What a stage's ``main`` gets: configuration, its folder, and access to upstream stages."""

    name: str
    cfg: config_mod.Config
    run_dir: Path
    dir: Path
    freshness: rf.Freshness
    upstream_names: tuple[str, ...] = ()
    force: bool = False
    previous: dict | None = None  # the manifest of the last finished run of this stage, if any
    changed_output: str | None = None  # an output of that run that changed or disappeared since
    rank: int = 0
    world_size: int = 1
    outputs: dict[str, str] = field(default_factory=dict)
    used: dict[str, str] = field(default_factory=dict)
    checked: dict[str, Any] = field(default_factory=dict)  # what the driver's check found, for its main
    _device: Any = None

    def upstream(self, stage_name: str, required: bool = True) -> Path | None:
        """The folder of an upstream stage, checked finished and unchanged.

        With ``required=False`` a missing or stale optional upstream gives None.
        """
        if stage_name not in self.upstream_names:
            raise RuntimeError(f"{self.name} did not declare {stage_name} as an upstream stage")
        why = self.freshness.problem(stage_name)
        if why is not None:
            if required:
                raise StaleUpstreamError(why)
            return None
        folder = self.freshness.specs[stage_name].folder(self.run_dir, self.freshness.cfg)
        m = rf.read_manifest(folder)
        assert m is not None
        self.used[stage_name] = rf.outputs_digest(m)
        return folder

    def output(self, *parts: str, digest: str = "sha256") -> Path:
        """A path under this stage's folder, recorded in the manifest when the stage ends."""
        rel = Path(*parts)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"output {rel} must be relative to the stage folder")
        p = self.dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        self.outputs[rel.as_posix()] = digest
        return p

    def device(self) -> Any:
        """The torch device of this process (CUDA:LOCAL_RANK under torchrun)."""
        if self._device is None:
            from .device import resolve_device

            self._device = resolve_device(self.freshness.cfg.run.device)
        return self._device


# ----------------------------------------------------------------------------- command line


@dataclass
class Invocation:
    """A parsed stage command line and the configuration it resolves to."""

    cfg: config_mod.Config
    run_dir: Path
    force: bool
    changes: list[str]  # keys this command changes in RUN/config.yaml ("key: old -> new")
    new_run: bool  # RUN/config.yaml does not exist yet
    args: list[str]  # the -c and override arguments (for hints)


def _alias_value(target: str, raw: str) -> str:
    """``--lr_decay_epochs 700,800,900`` -> a YAML list when the key holds a list."""
    sec, key = target.split(".")
    tp = typing.get_type_hints(config_mod.SECTIONS[sec])[key]
    if typing.get_origin(tp) is list and "," in raw and not raw.strip().startswith("["):
        return f"[{raw}]"
    return raw


class ArgParser(argparse.ArgumentParser):
    """argparse whose "unrecognized arguments" line never quotes a word that may hold a secret
    (``--password hunter2``): ``hidden`` holds those words (``config.secret_args``)."""

    hidden: set[str] = set()

    def error(self, message: str) -> typing.NoReturn:
        head, sep, rest = message.partition("unrecognized arguments: ")
        if sep:
            message = head + sep + " ".join(config_mod.NOT_SHOWN if w in self.hidden else w for w in rest.split(" "))
        super().error(message)


def build_parser(spec: StageSpec, doc: str | None) -> argparse.ArgumentParser:
    p = ArgParser(
        prog=script_for(spec.name),
        description=(doc or "").strip().splitlines()[0] if doc else None,
        epilog="Overrides: section.key=value (values parse as YAML), e.g. train.epochs=10; options and overrides "
        "in any order. Exit codes: 0 done, 2 bad input or configuration, 1 unexpected failure, 130 interrupted.",
    )
    p.add_argument("-c", "--config", action="append", default=[], metavar="YAML",
                   help="configuration file; repeat to layer files (later files win). For an existing run, "
                   "RUN/config.yaml is the base and these change it")
    p.add_argument("--run", default=None, metavar="DIR", help="run directory (default: run.dir from the config)")
    p.add_argument("--force", action="store_true", help="rerun even if the stage is up to date "
                   "(an unfinished run still resumes)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="configuration overrides")
    for flag, target in spec.aliases.items():
        if flag in spec.switches:
            p.add_argument(f"--{flag}", dest=f"alias__{flag}", action="store_true", default=None,
                           help=f"alias of {target}=true")
        else:
            p.add_argument(f"--{flag}", dest=f"alias__{flag}", default=None, metavar="V", help=f"alias of {target}")
    return p


def parse_args(spec: StageSpec, argv: Sequence[str], doc: str | None = None) -> Invocation:
    """Parse a stage's command line and resolve the configuration (reads files, writes none)."""
    parser = build_parser(spec, doc)
    parser.hidden = config_mod.secret_args(argv)
    args = parser.parse_intermixed_args(list(argv))
    overrides = []
    for flag, target in spec.aliases.items():
        v = getattr(args, f"alias__{flag}")
        if v is not None:
            overrides.append(f"{target}={'true' if v is True else _alias_value(target, v)}")
    overrides += list(args.overrides)  # explicit key=value wins over aliases
    first = config_mod.load_config(args.config, overrides)
    run_dir = Path(args.run) if args.run else Path(first.run.dir)
    saved = rf.read_run_config(run_dir)
    if saved is None:
        cfg, changes = first, []
    else:
        cfg = config_mod.load_config(args.config, overrides, base=saved,
                                     base_origin=str(run_dir / rf.RUN_CONFIG))
        changes = rf.run_config_changes(saved, cfg)
    cfg.run.dir = str(run_dir)
    hint_args = [x for c in args.config for x in ("-c", c)] + [a for a in argv if "=" in a and not a.startswith("-")]
    return Invocation(cfg, run_dir, bool(args.force), changes, saved is None, hint_args)


# ----------------------------------------------------------------------------- logging


class _OneLineConsole(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.exc_text = None
        saved = record.exc_info
        record.exc_info = None  # tracebacks go to log.txt only
        try:
            return super().format(record)
        finally:
            record.exc_info = saved


class _Buffer(logging.Handler):
    """Keeps records until the stage may write its ``log.txt`` (a refused stage writes nothing)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(level: str, is_main: bool) -> tuple[list[logging.Handler], _Buffer]:
    """Console handler (one line per record) and a buffer that ``start_log_file`` flushes to ``log.txt``."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(getattr(logging, level.upper(), logging.INFO) if is_main else logging.WARNING)
    console.setFormatter(_OneLineConsole("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    buffer = _Buffer()
    for h in (console, buffer):
        root.addHandler(h)
    for noisy in ("PIL", "matplotlib", "urllib3", "h5py", "fsspec", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return [console, buffer], buffer


def start_log_file(stage_dir: Path, buffer: _Buffer, handlers: list[logging.Handler]) -> None:
    """Open ``log.txt`` (appended, never through a symbolic link) and write the buffered records."""
    fd = rf.open_log_nofollow(stage_dir / "log.txt")
    fh = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8"))
    fh.setLevel(logging.DEBUG)
    fh.setFormatter(logging.Formatter(FILE_FORMAT))
    for r in buffer.records:
        fh.handle(r)
    root = logging.getLogger()
    root.removeHandler(buffer)
    buffer.records.clear()
    root.addHandler(fh)
    handlers.append(fh)


# ----------------------------------------------------------------------------- environment facts


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "torchvision", "timm", "numpy", "pillow", "sqlalchemy", "scikit-learn", "pyyaml"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def _device_text(ctx: Context) -> str | None:
    if "torch" not in sys.modules:
        return "cpu (torch not loaded)"
    try:
        from .device import describe

        return describe(ctx.device())
    except Exception:  # noqa: BLE001 - a device problem must not stop the manifest
        return None


def _redact_argv(argv: Sequence[str]) -> list[str]:
    out = []
    for a in argv:
        key = a.split("=", 1)[0]
        if "=" in a and config_mod.is_secret_key(key):
            out.append(f"{key}={config_mod.REDACTED}")
        else:
            out.append(a)
    return out


# ----------------------------------------------------------------------------- signals and processes


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _init_distributed(device_spec: str) -> tuple[int, int]:
    """Under torchrun: the process group, its backend chosen by the device (``device.process_plan``:
    NCCL for CUDA, gloo for the CPU; ``ConfigError`` for a device the processes cannot share)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch
        import torch.distributed as dist

        from .device import process_plan

        if not dist.is_initialized():
            plan = process_plan(device_spec)
            if plan.device.type == "cuda":
                torch.cuda.set_device(plan.device)
            dist.init_process_group(backend=plan.backend)
        rank, world = dist.get_rank(), dist.get_world_size()
    return rank, world


def _go_no_go(world: int) -> Any:
    """``distributed.go_no_go`` under torchrun; nothing to share in one process (torch not imported)."""
    if world > 1:
        from .distributed import go_no_go

        return go_no_go()
    return contextlib.nullcontext()


def _send_email(cfg: config_mod.Config, event: str, info: dict) -> None:
    """E-mail per config; a failure to send is logged and never changes the stage's outcome."""
    if not cfg.notify.enabled:
        return
    try:
        from .notify import send_stage_email

        send_stage_email(cfg.notify, event, info)
    except Exception as e:  # noqa: BLE001 - the stage's own outcome must win
        log.error("could not send the %s e-mail: %s", event, e.__class__.__name__)


# ----------------------------------------------------------------------------- checks


def rerun_hint(stage_name: str, run_dir: Path, extra: Sequence[str] = ()) -> str:
    words = ["python", script_for(stage_name), "--run", str(run_dir), *extra]
    return f"run `{shlex.join(words)}`"


def _check_upstream(spec: StageSpec, inv: Invocation, fresh: rf.Freshness, specs: dict[str, StageSpec]) -> None:
    """Raise ``StaleUpstreamError`` naming the stage to run when an upstream is not usable."""
    for up in spec.upstream(inv.cfg):
        folder = specs[up].folder(inv.run_dir, inv.cfg)
        running = rf.holder(folder)
        if running is not None:
            raise StaleUpstreamError(f"{spec.name} needs {up}, which is running: "
                                     f"{rf.running_message(up, inv.run_dir, running)}")
        if up in spec.optional_upstream:
            continue
        why = fresh.problem(up)
        if why is not None:
            raise StaleUpstreamError(why)


def _check_external(spec: StageSpec, cfg: config_mod.Config) -> None:
    """An input outside the run folder (``data.root``, ``inference.input``...) must exist before anything is written."""
    for p in spec.external(cfg):
        if not Path(p).exists():
            values = {k: config_mod.get_key(cfg, k) for k in spec.keys}
            keys = [k for k, v in values.items() if str(p) == v or (isinstance(v, list) and str(p) in v)]
            raise UserError(f"{keys[0] if keys else 'input'}: {p} does not exist")


def _check_stage_folder(stage_dir: Path) -> None:
    """What the wrapper will write in the stage folder can be written: ``log.txt`` is not a link."""
    log_txt = stage_dir / "log.txt"
    if log_txt.is_symlink():
        raise UserError(f"{log_txt} is a symbolic link: logs are never written through links; remove it")


def _own_state(spec: StageSpec, inv: Invocation, fresh: rf.Freshness, stage_dir: Path
               ) -> tuple[dict | None, str | None]:
    """(the last finished run's manifest or None, why this stage runs; None = it is up to date)."""
    old = rf.read_manifest(stage_dir)
    if old is None:
        why = "not run yet" if not (stage_dir / "log.txt").exists() else \
            "the last run did not finish: continuing it"
        return None, why
    if old.get("format") != rf.FORMAT:
        return old, "its manifest is of an older version of this tool"
    why = fresh.own_problem(spec.name, old)
    if why is None and inv.force:
        why = "--force"
    return old, why


def downstream(table: dict[str, StageSpec], names: set[str], cfg: config_mod.Config) -> list[str]:
    """``names`` and every stage of ``table`` that reads one of them, directly or not, in the table's
    (pipeline) order."""
    out = set(names)
    for s, spec in table.items():
        if set(spec.upstream(cfg)) & out:
            out.add(s)
    return [s for s in table if s in out]


def stages_reading(table: dict[str, StageSpec], keys: set[str]) -> set[str]:
    """The stages of ``table`` that declare one of ``keys`` (``section.key``)."""
    return {s.name for s in table.values() if set(s.hashed_keys) & keys}


def _config_change_message(inv: Invocation, specs: dict[str, StageSpec]) -> str:
    keys = {c.split(":")[0] for c in inv.changes}
    affected = downstream(specs, stages_reading(specs, {k for k in keys if config_mod.is_semantic(k)}), inv.cfg)
    stale = [s for s in affected if s in specs and rf.read_manifest(specs[s].folder(inv.run_dir, inv.cfg))]
    tail = f"; out of date now: {', '.join(stale)}" if stale else "; no finished stage is affected"
    return f"{inv.run_dir / rf.RUN_CONFIG}: " + "; ".join(inv.changes) + tail


# ----------------------------------------------------------------------------- running a stage


@dataclass
class _Before:
    """What a stage's start changes, as it was before (rank 0): put back when the stage is refused
    mid-run (exit 2) without having changed its folder."""

    run_config: bytes | None  # RUN/config.yaml (None: the run had none)
    stage_config: bytes | None  # the stage's config.yaml
    manifest: bytes | None  # the stage's manifest.json (a finished stage)
    listing: dict[str, tuple[int, int]]  # the stage folder's own files and folders (``_listing``)
    created: Path | None  # the outermost folder of the stage folder's path that this command creates

    @classmethod
    def take(cls, inv: Invocation, stage_dir: Path) -> _Before:
        def read(p: Path) -> bytes | None:
            return p.read_bytes() if p.is_file() else None

        created, p = None, stage_dir
        while not p.exists() and p != p.parent:
            created, p = p, p.parent
        return cls(read(inv.run_dir / rf.RUN_CONFIG), read(stage_dir / "config.yaml"), read(stage_dir / rf.MANIFEST),
                   _listing(stage_dir), created)


WRAPPER_FILES = (rf.MANIFEST, "config.yaml", "log.txt", rf.LOCK)  # what the wrapper itself writes in a stage folder


def _listing(stage_dir: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of what the driver may have written in its folder: every
    file and folder but the wrapper's own files, temporaries, and sub-folders that hold their own
    ``log.txt`` (another stage's folder, as 07's ``predict/<name>/``, or 03's ``previous-*``)."""
    out: dict[str, tuple[int, int]] = {}
    for root, dirs, files in os.walk(stage_dir):
        here = Path(root)
        dirs[:] = [d for d in dirs if not (here / d / "log.txt").exists()]
        for name in [*dirs, *files]:
            p = here / name
            if (here == stage_dir and name in WRAPPER_FILES) or (name.startswith(".") and name.endswith(rf.TMP_SUFFIX)):
                continue
            with contextlib.suppress(FileNotFoundError):
                st = p.lstat()
                out[p.relative_to(stage_dir).as_posix()] = (st.st_size, st.st_mtime_ns) if p.is_file() else (-1, 0)
    return out


def _put_back(p: Path, data: bytes | None) -> None:
    """Write ``data`` to ``p`` atomically, or remove ``p`` when ``data`` is None."""
    if data is None:
        p.unlink(missing_ok=True)
        return
    with rf.atomic_open(p, "wb") as fh:
        fh.write(data)


def _roll_back(before: _Before, inv: Invocation, stage_dir: Path, old: dict | None) -> bool:
    """After a refusal (exit 2) in ``main``: when the driver changed nothing in its folder (and the
    outputs of the last finished run, a store on a server included, are unchanged), put back the
    manifest, the stage's ``config.yaml`` and ``RUN/config.yaml`` as they were, and say True:
    the stage is exactly as before the command. False: it had started writing, and is unfinished."""
    if _listing(stage_dir) != before.listing:
        return False
    if old is not None and rf.changed_outputs(stage_dir, old) is not None:
        return False
    try:
        _put_back(stage_dir / rf.MANIFEST, before.manifest)
        _put_back(stage_dir / "config.yaml", before.stage_config)
        if inv.changes or inv.new_run:
            _put_back(inv.run_dir / rf.RUN_CONFIG, before.run_config)
    except OSError as e:  # the refusal is still the outcome; the stage is then unfinished
        log.warning("could not put %s back as it was: %s", stage_dir, e)
        (stage_dir / rf.MANIFEST).unlink(missing_ok=True)
        return False
    return True


def _remove_created(before: _Before, stage_dir: Path) -> None:
    """A rolled-back stage whose folder this command created: remove what the wrapper wrote there,
    then the folders, innermost first, as long as they are empty (nothing else is ever removed)."""
    if before.created is None:
        return
    (stage_dir / "log.txt").unlink(missing_ok=True)
    p = stage_dir
    while True:
        try:
            p.rmdir()
        except OSError:
            return
        if p == before.created:
            return
        p = p.parent


def _begin(inv: Invocation, specs: dict[str, StageSpec], stage_dir: Path, buffer: _Buffer,
           handlers: list[logging.Handler], slog: logging.Logger) -> None:
    """The checks passed and the stage holds its lock (rank 0): run config, clean-up, config.yaml, log.txt."""
    if inv.changes:
        slog.info("%s", _config_change_message(inv, specs))
    if inv.changes or inv.new_run:
        rf.write_run_config(inv.run_dir, inv.cfg)
    for p in rf.remove_stale_temporaries(stage_dir):
        slog.info("removed %s (a temporary file left by a killed run)", p)
    (stage_dir / rf.MANIFEST).unlink(missing_ok=True)  # from here on the stage is unfinished
    with rf.atomic_open(stage_dir / "config.yaml") as fh:
        fh.write(config_mod.to_yaml(inv.cfg))
    start_log_file(stage_dir, buffer, handlers)


def _manifest(spec: StageSpec, inv: Invocation, ctx: Context, reads: set[str], argv: Sequence[str], started: str,
              t0: float, metrics: dict) -> dict[str, Any]:
    """``manifest.json``: what ran, on what, with which declared keys, and every output's digest."""
    values = config_mod.key_values(inv.cfg, spec.hashed_keys)
    return {
        "format": rf.FORMAT, "stage": spec.name, "status": "ok", "started": started, "finished": _now(),
        "elapsed_s": round(time.time() - t0, 3), "argv": _redact_argv([script_for(spec.name), *argv]),
        "host": socket.gethostname(), "git_commit": git_commit(),
        "config": values, "config_hash": config_mod.hash_values(values),
        "keys_read": sorted(reads), "undeclared_keys_read": sorted(reads - set(spec.keys)),
        "seed": inv.cfg.run.seed, "world_size": ctx.world_size, "device": _device_text(ctx),
        "versions": library_versions(),
        "inputs": {"upstream": {up: {"digest": d} for up, d in sorted(ctx.used.items())},
                   "external": {str(p): rf.fingerprint_external(p) for p in spec.external(inv.cfg)}},
        "outputs": rf.record_outputs(ctx.dir, ctx.outputs), "metrics": metrics,
    }


def _checks(spec: StageSpec, inv: Invocation, specs: dict[str, StageSpec], stage_dir: Path, rank0: bool
            ) -> tuple[rf.Freshness, dict | None, str | None]:
    """Read-only checks: (freshness, the last finished run's manifest, why the stage runs; None = up to date).

    Raises ``UserError`` when the stage must not run (its lock is held, an upstream is not usable).
    """
    hint_extra = inv.args if inv.changes else []
    fresh = rf.Freshness(inv.run_dir, inv.cfg, specs, lambda s: rerun_hint(s, inv.run_dir, hint_extra))
    if rank0:
        running = rf.holder(stage_dir)
        if running is not None:
            raise UserError(rf.running_message(spec.name, inv.run_dir, running))
    _check_upstream(spec, inv, fresh, specs)
    _check_external(spec, inv.cfg)
    old, why = _own_state(spec, inv, fresh, stage_dir)
    return fresh, old, why


def _failure(e: BaseException, spec: StageSpec, stage_dir: Path, slog: logging.Logger,
             unfinished: bool = False) -> tuple[int, str, str | None]:
    """(exit code, one line, traceback or None) of a stage that stopped, logged. ``unfinished``: a
    refusal after the stage had started writing (its line says so)."""
    if isinstance(e, UserError):
        line = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        if line.startswith("Caught "):  # re-raised by a DataLoader worker: the file is on the last line
            from .data import loader_error_line

            line = loader_error_line(e)
        if unfinished:
            line += f" ({spec.name} had started writing: it is unfinished now; rerun it once this is fixed)"
        slog.error("error: %s", line)
        return 2, line, None
    if isinstance(e, KeyboardInterrupt):
        line = f"interrupted ({e})" if str(e) else "interrupted (Ctrl-C)"
        slog.warning("%s: %s; rerun the same command to continue", spec.name, line)
        return 130, line, None
    line = f"{e.__class__.__name__}: {e}".splitlines()[0]
    slog.error("%s failed: %s (traceback in %s)", spec.name, line, stage_dir / "log.txt", exc_info=e)
    return 1, line, "".join(traceback.format_exception(e))


def _install_signals() -> dict:
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in old:
            signal.signal(s, interrupt)
    except ValueError:  # not in the main thread (tests)
        return {}
    return old


def _restore_signals(old: dict) -> None:
    for s, h in old.items():
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(s, h)


def _close(handlers: list[logging.Handler], lock: rf.StageLock, world: int) -> None:
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
    lock = rf.StageLock(stage_dir, spec.name, run_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    old: dict | None = None
    before: _Before | None = None  # set once the stage may write (rank 0)
    rolled_back = False
    try:
        rf.check_stage_folder(stage_dir, run_dir, spec.name)  # no configured name leads out of the stage's folder
        # every rank must hear of a refusal on one (rank 0's lock check): the group first, then the checks
        rank, world = _init_distributed(cfg.run.device)
        with _go_no_go(world):
            fresh, old, why = _checks(spec, inv, table, stage_dir, rank0)  # nothing is written before
        if why is None:
            if inv.changes:
                slog.info("%s", _config_change_message(inv, table))
            if rank0 and (inv.changes or inv.new_run):
                rf.write_run_config(run_dir, cfg)
            slog.info("%s is up to date (inputs and configuration unchanged since %s); use --force to rerun",
                      spec.name, old.get("finished") if old else "?")
            code, quiet = 0, True
            return 0
        rec_cfg, reads = config_mod.recording(cfg)
        ctx = Context(name=spec.name, cfg=rec_cfg, run_dir=run_dir, dir=stage_dir, freshness=fresh,
                      upstream_names=spec.upstream(cfg), force=inv.force, previous=old,
                      changed_output=rf.changed_outputs(stage_dir, old) if old else None, rank=rank,
                      world_size=world)
        with _go_no_go(world):  # a refusal on one rank (the lock, a driver's check) stops every rank
            # the check phase, still read only: the wrapper's own, then the driver's
            _check_stage_folder(stage_dir)
            check_fn = spec.check()
            if check_fn is not None:
                check_fn(ctx)
            if rank == 0:
                rf.check_writable(run_dir, stage_dir)  # one line, before the first write
                taken = _Before.take(inv, stage_dir)  # read before the first write
                lock.acquire()
                before = taken
                _begin(inv, table, stage_dir, buffer, handlers, slog)
        slog.info("%s: run folder %s; runs because %s", spec.name, run_dir, why)
        from .seed import seed_everything

        seed_everything(cfg.run.seed)
        if world > 1:  # torch is imported by a stage that runs, never by one that is up to date
            from .distributed import barrier

            barrier()
        with _go_no_go(world):  # a rank that fails stops the others, which would wait for it at the end
            metrics = spec.main()(ctx) or {}
        if rank == 0:
            manifest = _manifest(spec, inv, ctx, reads, argv, started, t0, metrics)
            if manifest["undeclared_keys_read"]:
                slog.error("internal: %s read configuration keys it does not declare: %s", spec.name,
                           ", ".join(manifest["undeclared_keys_read"]))
            rf.write_manifest(stage_dir, manifest)
            slog.info("%s finished in %.1f s", spec.name, time.time() - t0)
        code = 0
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - every outcome gets its exit code
        e = rf.as_user_error(e, run_dir)  # a permission error inside the run folder: one line, exit 2
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
