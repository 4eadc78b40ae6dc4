"""The wrapper every stage runs in: command line, logging, run folder, manifest, e-mail, exit codes.

A stage script calls ``stage.run(name, main, upstream=..., sections=...)``. ``run``:

1. parses ``-c`` (repeatable), ``--run``, ``--force`` and ``section.key=value`` overrides;
2. logs to the console and to ``RUN/<name>/log.txt``; seeds every generator from ``run.seed``;
3. checks that every upstream stage finished and is unchanged (else ``StaleUpstreamError`` naming
   the stage to run);
4. says "up to date" and exits 0 when the configuration and inputs equal those recorded in the
   stage's own manifest (``--force`` reruns);
5. removes the old ``manifest.json``, writes ``config.yaml``, calls ``main(ctx)``;
6. writes ``manifest.json`` last (its presence means the stage finished);
7. e-mails per the ``notify`` section, and exits 0 (done), 2 (bad input or configuration: one
   line, no traceback), 1 (unexpected: traceback in ``log.txt``) or 130 (interrupted).

Freshness (icefall's ``.done`` markers and DVC's lock file are the models): a manifest records
each output's size, mtime and digest and, for each upstream stage, the digest of that stage's
outputs. A stage is fresh when its manifest says ok, its outputs are unchanged on disk, and
each upstream it read is itself fresh with the outputs digest recorded.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from . import config as config_mod
from .errors import ConfigError, StaleUpstreamError, UserError
from .fileio import atomic_open, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

STAGES = [
    "01_random_split_dataset",
    "02_mean_std_variables",
    "03_main_supcon",
    "04_extract_features",
    "05_lut_threshold",
    "06_prune_features",
    "07_inference",
]
REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "manifest.json"
FORMAT = "plankton-manifest/1"

UpstreamSpec = Sequence[str] | Callable[[config_mod.Config], Sequence[str]]


def script_for(stage_name: str) -> str:
    """The script that produces a stage, e.g. ``03_main_supcon.py``."""
    return f"{stage_name}.py"


def _rerun_hint(stage_name: str, run_dir: Path) -> str:
    return f"run `python {script_for(stage_name)} --run {run_dir}`"


# ----------------------------------------------------------------------------- digests


def _digest_of(path: Path, kind: str) -> str:
    if kind == "sha256":
        return sha256_file(path)
    if kind == "feature_store":
        from .features import content_digest  # the LUT tables are left out (stage 06 adds them)

        return content_digest(path)
    raise ValueError(f"unknown digest kind {kind!r}")


def fingerprint_external(path: str | Path) -> str:
    """Digest of an input outside the run folder: sorted listing with sizes and mtimes.

    Hidden files and folders are left out, as every stage ignores them.
    """
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        st = p.stat()
        h.update(f"{p.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return h.hexdigest()
    if not p.is_dir():
        return "missing"
    for root, dirs, files in os.walk(p):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.startswith("."):
                continue
            fp = Path(root, f)
            try:
                st = fp.stat()
            except OSError:
                continue
            rel = fp.relative_to(p).as_posix()
            h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def outputs_digest(manifest: dict) -> str:
    """One digest of a stage's recorded outputs (what a downstream stage depends on)."""
    items = sorted((k, v["digest"]) for k, v in manifest.get("outputs", {}).items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def read_manifest(stage_dir: Path) -> dict | None:
    """The stage's manifest, or None when the stage has not finished (or the file is unreadable)."""
    p = stage_dir / MANIFEST
    if not p.is_file():
        return None
    try:
        m = read_json(p)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("status") == "ok" else None


class Freshness:
    """Memoised freshness checks of the stages of one run folder."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._memo: dict[str, str | None] = {}

    def problem(self, stage_name: str) -> str | None:
        """None when ``stage_name`` finished and is unchanged; else why not (one line)."""
        if stage_name not in self._memo:
            self._memo[stage_name] = self._check(stage_name)
        return self._memo[stage_name]

    def _check(self, stage_name: str) -> str | None:
        sdir = self.run_dir / stage_name
        m = read_manifest(sdir)
        if m is None:
            if (sdir / "log.txt").exists():
                return f"{stage_name} has not finished in {self.run_dir} (no manifest: it failed or is still running): {_rerun_hint(stage_name, self.run_dir)}"
            return f"{stage_name} has not been run in {self.run_dir}: {_rerun_hint(stage_name, self.run_dir)}"
        bad = changed_outputs(sdir, m)
        if bad:
            return f"{stage_name}'s output {bad} changed or disappeared since it ran: {_rerun_hint(stage_name, self.run_dir)} --force"
        for up, rec in m.get("inputs", {}).get("upstream", {}).items():
            why = self.problem(up)
            if why is not None:
                return why
            um = read_manifest(self.run_dir / up)
            if um is None or outputs_digest(um) != rec.get("digest"):
                return f"{stage_name} is out of date: {up} was rerun after it: {_rerun_hint(stage_name, self.run_dir)}"
        return None


def changed_outputs(stage_dir: Path, manifest: dict) -> str | None:
    """The first recorded output that is missing or whose content changed, else None.

    Size and mtime equal to the recorded ones are taken as unchanged; otherwise the digest is
    recomputed, so a touched but identical file is still fine.
    """
    for rel, rec in manifest.get("outputs", {}).items():
        p = stage_dir / rel
        if not p.is_file():
            return rel
        st = p.stat()
        kind = rec.get("digest_kind", "sha256")
        if kind == "sha256" and st.st_size == rec.get("size") and st.st_mtime_ns == rec.get("mtime_ns"):
            continue
        try:
            if _digest_of(p, kind) != rec.get("digest"):
                return rel
        except Exception as e:  # an unreadable store counts as changed
            log.debug("digest of %s failed: %s", p, e)
            return rel
    return None


# ----------------------------------------------------------------------------- context


@dataclass
class Context:
    """What a stage's ``main`` gets: configuration, its folder, and access to upstream stages."""

    name: str
    cfg: config_mod.Config
    run_dir: Path
    dir: Path
    force: bool = False
    rank: int = 0
    world_size: int = 1
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("stage"))
    upstream_names: tuple[str, ...] = ()
    optional_upstream: tuple[str, ...] = ()
    _outputs: dict[str, str] = field(default_factory=dict)
    _used: dict[str, str] = field(default_factory=dict)
    _device: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def upstream(self, stage_name: str, required: bool = True) -> Path | None:
        """The folder of an upstream stage, checked finished and unchanged.

        With ``required=False`` a missing or stale optional upstream gives None.
        """
        if stage_name not in self.upstream_names and stage_name not in self.optional_upstream:
            raise RuntimeError(f"{self.name} did not declare {stage_name} as an upstream stage")
        why = Freshness(self.run_dir).problem(stage_name)
        if why is not None:
            if required:
                raise StaleUpstreamError(why)
            return None
        m = read_manifest(self.run_dir / stage_name)
        assert m is not None
        self._used[stage_name] = outputs_digest(m)
        return self.run_dir / stage_name

    def output(self, *parts: str, digest: str = "sha256") -> Path:
        """A path under this stage's folder, recorded in the manifest when the stage ends."""
        rel = Path(*parts)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"output {rel} must be relative to the stage folder")
        p = self.dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        self._outputs[rel.as_posix()] = digest
        return p

    def device(self):
        """The torch device of this process (CUDA:LOCAL_RANK under torchrun)."""
        if self._device is None:
            from .device import resolve_device

            self._device = resolve_device(self.cfg.run.device)
        return self._device


# ----------------------------------------------------------------------------- command line


def _alias_value(target: str, raw: str) -> str:
    """``--lr_decay_epochs 700,800,900`` -> a YAML list when the key holds a list."""
    sec, key = target.split(".")
    tp = typing.get_type_hints(config_mod.SECTIONS[sec])[key]
    if typing.get_origin(tp) is list and "," in raw and not raw.strip().startswith("["):
        return f"[{raw}]"
    return raw


def build_parser(name: str, doc: str | None, aliases: dict[str, str] | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=script_for(name),
        description=(doc or "").strip().splitlines()[0] if doc else None,
        epilog="Overrides: section.key=value (values parse as YAML), e.g. train.epochs=10. "
        "Exit codes: 0 done, 2 bad input or configuration, 1 unexpected failure, 130 interrupted.",
    )
    p.add_argument("-c", "--config", action="append", default=[], metavar="YAML",
                   help="configuration file; repeat to layer files (later files win)")
    p.add_argument("--run", default=None, metavar="DIR", help="run directory (default: run.dir from the config)")
    p.add_argument("--force", action="store_true", help="rerun even if the stage is up to date")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="configuration overrides")
    for flag, target in (aliases or {}).items():
        if flag in config_mod.SUPCON_FLAGS:
            p.add_argument(f"--{flag}", dest=f"alias__{flag}", action="store_true", default=None,
                           help=f"alias of {target}=true")
        else:
            p.add_argument(f"--{flag}", dest=f"alias__{flag}", default=None, metavar="V",
                           help=f"alias of {target}")
    return p


def parse_args(name: str, argv: Sequence[str], doc: str | None = None,
               aliases: dict[str, str] | None = None) -> tuple[config_mod.Config, Path, bool]:
    """Parse a stage's command line into (config, run folder, force)."""
    args = build_parser(name, doc, aliases).parse_args(list(argv))
    overrides = []
    for flag, target in (aliases or {}).items():
        v = getattr(args, f"alias__{flag}")
        if v is None:
            continue
        overrides.append(f"{target}={'true' if v is True else _alias_value(target, v)}")
    overrides += list(args.overrides)  # explicit key=value wins over aliases
    cfg = config_mod.load_config(args.config, overrides)
    if args.run:
        cfg.run.dir = args.run
    return cfg, Path(cfg.run.dir), bool(args.force)


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


def setup_logging(stage_dir: Path | None, level: str, is_main: bool) -> list[logging.Handler]:
    """Console handler (one line per record) and, on rank 0, ``log.txt`` (appended, DEBUG)."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    handlers: list[logging.Handler] = []
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(getattr(logging, level.upper(), logging.INFO) if is_main else logging.WARNING)
    console.setFormatter(_OneLineConsole("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    handlers.append(console)
    if stage_dir is not None and is_main:
        fh = logging.FileHandler(stage_dir / "log.txt", encoding="utf-8")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
        handlers.append(fh)
    for h in handlers:
        root.addHandler(h)
    for noisy in ("PIL", "matplotlib", "urllib3", "h5py", "fsspec", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handlers


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
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _device_text(ctx: Context) -> str | None:
    if "torch" not in sys.modules:
        return "cpu (torch not loaded)"
    try:
        from .device import describe

        return describe(ctx.device())
    except Exception:  # a device problem must not stop the manifest
        return None


def _redact_argv(argv: Sequence[str]) -> list[str]:
    out = []
    for a in argv:
        key = a.split("=", 1)[0]
        if "=" in a and config_mod._SECRET_RE.search(key) and not key.endswith("_env"):
            out.append(f"{key}={config_mod.REDACTED}")
        else:
            out.append(a)
    return out


# ----------------------------------------------------------------------------- running a stage


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=backend)
        rank, world = dist.get_rank(), dist.get_world_size()
    return rank, world


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


def _sigterm_to_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt(f"signal {signum}")


def _send_email(cfg: config_mod.Config, event: str, info: dict) -> None:
    """E-mail per config; a failure to send is logged and never changes the stage's outcome."""
    if not cfg.notify.enabled:
        return
    try:
        from .notify import send_stage_email

        send_stage_email(cfg.notify, event, info)
    except Exception as e:  # noqa: BLE001 - the stage's own outcome must win
        log.error("could not send the %s e-mail: %s", event, e.__class__.__name__)


def execute(name: str, main: Callable[[Context], dict | None], argv: Sequence[str] | None = None, *,
            upstream: UpstreamSpec = (), optional_upstream: UpstreamSpec = (),
            sections: Iterable[str] = (), external: Callable[[config_mod.Config], list] | None = None,
            aliases: dict[str, str] | None = None, doc: str | None = None) -> int:
    """Run one stage and return its exit code (``run`` calls this and exits)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg, run_dir, force = parse_args(name, argv, doc, aliases)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    stage_dir = run_dir / name
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        stage_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot create the stage folder {stage_dir}: {e.strerror}", file=sys.stderr)
        return 2
    handlers = setup_logging(stage_dir, cfg.run.log_level, rank0)
    old_term = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    except ValueError:  # not in the main thread (tests)
        pass

    t0 = time.time()
    started = _now()
    slog = logging.getLogger(name)
    ctx: Context | None = None
    metrics: dict | None = None
    code = 1
    err_line: str | None = None
    tb_text: str | None = None
    up_to_date = False
    try:
        slog.info("%s: run folder %s", name, run_dir)
        rank, world = _init_distributed()
        from .seed import seed_everything

        seed_everything(cfg.run.seed)
        ups = tuple(upstream(cfg) if callable(upstream) else upstream)
        opt_ups = tuple(optional_upstream(cfg) if callable(optional_upstream) else optional_upstream)
        ctx = Context(name=name, cfg=cfg, run_dir=run_dir, dir=stage_dir, force=force, rank=rank,
                      world_size=world, log=slog, upstream_names=ups, optional_upstream=opt_ups)
        fresh = Freshness(run_dir)
        for up in ups:
            why = fresh.problem(up)
            if why is not None:
                raise StaleUpstreamError(why)
        up_digests = {up: outputs_digest(read_manifest(run_dir / up) or {}) for up in ups}
        for up in opt_ups:
            if fresh.problem(up) is None:
                up_digests[up] = outputs_digest(read_manifest(run_dir / up) or {})
        ext = {str(p): fingerprint_external(p) for p in (external(cfg) if external else [])}
        secs = list(sections) or list(config_mod.SECTIONS)
        cfg_hash = cfg.hash(secs)

        old = read_manifest(stage_dir)
        if old is not None and not force:
            same = (old.get("config_hash") == cfg_hash
                    and old.get("inputs", {}).get("upstream") == {k: {"digest": v} for k, v in up_digests.items()}
                    and old.get("inputs", {}).get("external") == ext
                    and changed_outputs(stage_dir, old) is None)
            if same:
                slog.info("%s is up to date (inputs and configuration unchanged since %s); use --force to rerun",
                          name, old.get("finished"))
                code, up_to_date = 0, True
                return 0
        if rank == 0:
            (stage_dir / MANIFEST).unlink(missing_ok=True)  # from here on the stage is unfinished
            with atomic_open(stage_dir / "config.yaml") as fh:
                fh.write(config_mod.to_yaml(cfg))
        _barrier(world)

        metrics = main(ctx) or {}
        _barrier(world)
        if rank == 0:
            outputs = {}
            for rel, kind in sorted(ctx._outputs.items()):
                p = stage_dir / rel
                if not p.is_file():
                    continue
                st = p.stat()
                outputs[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                "digest": _digest_of(p, kind), "digest_kind": kind}
            manifest = {
                "format": FORMAT,
                "stage": name,
                "status": "ok",
                "started": started,
                "finished": _now(),
                "elapsed_s": round(time.time() - t0, 3),
                "argv": _redact_argv([script_for(name), *argv]),
                "host": socket.gethostname(),
                "git_commit": git_commit(),
                "config_hash": cfg_hash,
                "seed": cfg.run.seed,
                "world_size": world,
                "device": _device_text(ctx),
                "versions": library_versions(),
                "inputs": {"upstream": {k: {"digest": v} for k, v in up_digests.items()}, "external": ext},
                "outputs": outputs,
                "metrics": metrics,
            }
            write_json(stage_dir / MANIFEST, manifest)
            slog.info("%s finished in %.1f s", name, time.time() - t0)
        code = 0
    except UserError as e:
        err_line = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        if err_line.startswith("Caught "):  # re-raised by a DataLoader worker: the file is on the last line
            from .data import loader_error_line

            err_line = loader_error_line(e)
        slog.error("error: %s", err_line)
        code = 2
    except KeyboardInterrupt as e:
        err_line = f"interrupted ({e})" if str(e) else "interrupted (Ctrl-C)"
        slog.warning("%s: %s", name, err_line)
        code = 130
    except Exception as e:  # noqa: BLE001 - every unexpected failure gets a traceback and exit 1
        err_line = f"{e.__class__.__name__}: {e}".splitlines()[0]
        tb_text = traceback.format_exc()
        slog.error("%s failed: %s (traceback in %s)", name, err_line, stage_dir / "log.txt", exc_info=True)
        code = 1
    finally:
        if not up_to_date and rank0:
            event = {0: "success", 130: "interrupt"}.get(code, "failure")
            _send_email(cfg, event, {
                "stage": name, "run_dir": str(run_dir), "host": socket.gethostname(),
                "elapsed_s": time.time() - t0, "error": err_line, "traceback": tb_text,
                "log_path": str(stage_dir / "log.txt"), "exit_code": code, "metrics": metrics,
            })
        try:
            signal.signal(signal.SIGTERM, old_term)
        except (ValueError, TypeError):
            pass
        if world > 1:
            try:
                import torch.distributed as dist

                if dist.is_initialized():
                    dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
        for h in handlers:
            logging.getLogger().removeHandler(h)
            h.close()
    return code


def run(name: str, main: Callable[[Context], dict | None], **kwargs: Any) -> typing.NoReturn:
    """Entry point of every stage script: ``stage.run("04_extract_features", main, ...)``."""
    if "doc" not in kwargs:
        kwargs["doc"] = sys.modules["__main__"].__doc__
    sys.exit(execute(name, main, **kwargs))
