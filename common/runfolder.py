"""The run folder: the run's configuration, stage manifests, freshness and stage locks.

A run folder ``RUN/`` holds ``config.yaml`` (the run's configuration) and one folder per stage.
A stage folder holds ``manifest.json``, written last: its presence means the stage finished. The
manifest records each output's size, mtime and digest, the values of the configuration keys the
stage declares, and the digest of each upstream stage's outputs it read.

Freshness (icefall's ``.done`` markers and DVC's ``dvc.lock`` are the models): a stage is fresh
under a configuration when its manifest says ok, its outputs are unchanged on disk, the values
of its declared semantic keys equal the recorded ones, its external inputs are unchanged, and
each upstream it read is itself fresh with the outputs digest recorded. Nothing is special-cased:
every reason is one line that names the key or the output and the command to run.

A stage that runs holds ``RUN/<stage>/.lock`` (pid, host, start time). A second process on the
same stage, or on a stage whose upstream is running, is refused naming the holder; a lock left by
a dead process on this host is taken over with a warning.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from . import config as config_mod
from .errors import ConfigError, UserError
from .fileio import atomic_open, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RUN_CONFIG = "config.yaml"
LOCK = ".lock"
FORMAT = "plankton-manifest/2"
TMP_SUFFIX = ".tmp"  # fileio.atomic_path's temporary files: ".<name>.<random>.tmp"


# ----------------------------------------------------------------------------- digests


def digest_of(path: Path, kind: str) -> str:
    """The digest of one output: ``sha256`` of the file or the feature store's ``content_digest``.

    ``store_ref``: a JSON file naming a feature store on a server (``{"store": {"url", "schema",
    "password_env", "digest"}}``, stage 04's ``model.json``): its sha256 while the server's store
    still has the recorded content digest, else a digest that differs (the store changed).
    """
    if kind == "sha256":
        return sha256_file(path)
    if kind == "store_ref":
        from .features import PgStore, content_digest

        rec = (json.loads(Path(path).read_text(encoding="utf-8")).get("store") or {})
        target = PgStore.from_record(rec)
        if target is not None:
            now = content_digest(target)
            if now != rec.get("digest"):
                return f"store changed: {now}"
        return sha256_file(path)
    if kind == "feature_store":
        from .features import content_digest

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


def record_outputs(stage_dir: Path, outputs: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``{relative path: {size, mtime_ns, digest, digest_kind}}`` of the outputs that exist."""
    out = {}
    for rel, kind in sorted(outputs.items()):
        p = stage_dir / rel
        if not p.is_file():
            continue
        st = p.stat()
        out[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "digest": digest_of(p, kind), "digest_kind": kind}
    return out


def changed_outputs(stage_dir: Path, manifest: dict) -> str | None:
    """The first recorded output that is missing or whose content changed, else None.

    Size and mtime equal to the recorded ones are taken as unchanged (only the stage that owns a
    file writes it); otherwise the digest is recomputed, so a touched but identical file is fine.
    """
    for rel, rec in manifest.get("outputs", {}).items():
        p = stage_dir / rel
        if not p.is_file():
            return rel
        st = p.stat()
        same_file = st.st_size == rec.get("size") and st.st_mtime_ns == rec.get("mtime_ns")
        if same_file and rec.get("digest_kind") != "store_ref":  # a store on a server is always checked
            continue
        try:
            if digest_of(p, rec.get("digest_kind", "sha256")) != rec.get("digest"):
                return rel
        except Exception as e:  # noqa: BLE001 - an unreadable output counts as changed
            log.debug("digest of %s failed: %s", p, e)
            return rel
    return None


def outdated_store(stage_dir: Path, manifest: dict) -> str | None:
    """The first recorded feature store (``feature_store`` or ``store_ref`` output) that a former
    version of this tool wrote (an older schema version), as ``"<output> (schema version N, ...)"``;
    else None. One ``meta`` row read per store; a store that cannot be read is left to
    ``changed_outputs``."""
    from .features import SCHEMA_VERSION, PgStore, schema_version

    for rel, rec in manifest.get("outputs", {}).items():
        kind = rec.get("digest_kind")
        if kind not in ("feature_store", "store_ref"):
            continue
        p = stage_dir / rel
        name = rel
        try:
            if kind == "store_ref":
                target = PgStore.from_record(json.loads(p.read_text(encoding="utf-8")).get("store"))
                if target is None:
                    continue
                name = f"{rel}'s feature store {target}"  # the URL holds no password (PgStore refuses one)
                v = schema_version(target)
            else:
                v = schema_version(p)
        except Exception as e:  # noqa: BLE001 - unreadable: changed_outputs says so
            log.debug("schema version of %s: %s", p, e)
            continue
        if v is not None and v < SCHEMA_VERSION:
            return f"{name} (feature-store schema version {v}; this version of the tool reads {SCHEMA_VERSION})"
    return None


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


# ----------------------------------------------------------------------------- the run's configuration


def read_run_config(run_dir: Path) -> dict | None:
    """``RUN/config.yaml`` as a mapping, None when the run has none yet."""
    p = run_dir / RUN_CONFIG
    if not p.is_file():
        return None
    try:
        data = config_mod.load_yaml(p.read_text(encoding="utf-8"), str(p))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{p} is unreadable ({e.__class__.__name__}): fix it or delete it to start the run's "
                          "configuration again from -c files") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return data


def write_run_config(run_dir: Path, cfg: config_mod.Config) -> None:
    """Write ``RUN/config.yaml`` atomically (invocation keys left out, secrets redacted)."""
    text = ("# The run's configuration: a stage given only --run uses it; -c files and key=value overrides\n"
            "# change it (the stage says which keys changed and which stages that makes out of date).\n"
            + yaml.safe_dump(config_mod.run_config_dict(cfg), sort_keys=False, default_flow_style=False))
    with atomic_open(run_dir / RUN_CONFIG) as fh:
        fh.write(text)


def run_config_changes(saved: dict | None, cfg: config_mod.Config) -> list[str]:
    """``["lut.tolerance: 0.005 -> 0.01", ...]``: what ``cfg`` changes in the saved run configuration."""
    if saved is None:
        return []
    base = config_mod.load_config(base=saved) if saved else config_mod.Config()
    keys = [k for k in config_mod.all_keys() if k not in config_mod.INVOCATION_KEYS]
    old = {k: config_mod.get_key(base, k) for k in keys}
    new = {k: config_mod.get_key(cfg, k) for k in keys}
    return config_mod.diff_values(old, new)


# ----------------------------------------------------------------------------- locks


@dataclass
class LockInfo:
    pid: int
    host: str
    started: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.started}"

    def alive(self) -> bool | None:
        """True/False for a process on this host; None when it runs on another host (unknown)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def read_lock(stage_dir: Path) -> LockInfo | None:
    """The holder recorded in ``stage_dir/.lock``, None when there is no lock."""
    p = stage_dir / LOCK
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        return LockInfo(int(d["pid"]), str(d["host"]), str(d["started"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return LockInfo(-1, "?", "?")  # a torn lock: treated as left by a dead process


def holder(stage_dir: Path) -> LockInfo | None:
    """The live (or possibly live, on another host) holder of a stage's lock, else None."""
    info = read_lock(stage_dir)
    if info is None or info.pid == os.getpid():
        return None
    return None if info.alive() is False or info.pid < 0 else info


class StageLock:
    """``stage_dir/.lock``: held through ``fcntl.flock`` on the lock file, kept open while the stage runs.

    Why flock (issue 17): the kernel drops the lock when its holder dies, however it dies, so a
    lock left by a dead process is taken over by the very same atomic call that takes a free one
    (``flock(LOCK_EX | LOCK_NB)``): of any number of processes started together, exactly one gets
    it and the others are refused naming it. Deleting a stale file and creating a new one (the
    former way) let two processes both delete and both create. The only race left, a holder
    unlinking the file on release between another's ``open`` and ``flock``, is closed by checking,
    once locked, that the path still names the file that was locked (else retry).

    The file still records the holder (pid, host, start time) for messages and for ``holder``;
    a lock file naming a live process on this host (written without flock) or any process on
    another host (flock on a network file system may not reach it) is still respected, as before.
    """

    def __init__(self, stage_dir: Path, stage_name: str, run_dir: Path):
        self.path = stage_dir / LOCK
        self.stage_name, self.run_dir = stage_name, run_dir
        self.held = False
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(50):  # a retry only when a releasing holder unlinked the file under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise UserError(running_message(self.stage_name, self.run_dir, self._live_holder())) from None
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # released (unlinked) between our open and our flock: try the new file
                    os.close(fd)
                    continue
                info = _parse_lock(os.pread(fd, 4096, 0))
                if info is not None and info.pid < 0:
                    log.warning("%s: taking over a damaged lock file %s (no process holds it)", self.stage_name,
                                self.path)
                elif info is not None:
                    if info.alive() is not False and info.pid != os.getpid():  # respected as before (docstring)
                        raise UserError(running_message(self.stage_name, self.run_dir, info))
                    log.warning("%s: taking over the lock left by %s (that process is gone)", self.stage_name,
                                info.describe())
                text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                   "started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")})
                os.ftruncate(fd, 0)
                os.pwrite(fd, text.encode(), 0)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            self._fd, self.held = fd, True
            os.register_at_fork(after_in_child=self._not_in_child)
            return
        raise UserError(f"cannot take the lock {self.path}: it keeps changing; is another process starting "
                        f"{self.stage_name}?")

    def _not_in_child(self) -> None:
        """A forked child (a DataLoader or scan worker) closes its copy of the lock's descriptor and
        never releases it: the lock goes with the stage's own process, even if a worker outlives it."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self.held = None, False

    def _live_holder(self) -> LockInfo:
        """The holder of the flock, named in the lock file. A holder that has just taken the lock
        may not have written its record yet (the file is empty, torn, or still names the dead
        process it took over from): waited for, briefly."""
        for _ in range(200):
            info = read_lock(self.path.parent)
            if info is not None and info.pid >= 0 and info.alive() is not False:
                return info
            time.sleep(0.01)
        return LockInfo(-1, "another process", "just now")

    def release(self) -> None:
        if not self.held:
            return
        fd, self._fd, self.held = self._fd, None, False
        try:  # unlink only our own file (someone may have deleted it by hand and another taken a new one)
            if fd is not None and os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            if fd is not None:
                os.close(fd)  # drops the flock


def _parse_lock(data: bytes) -> LockInfo | None:
    """The holder recorded in a lock file's bytes; None when empty; pid -1 when torn."""
    if not data.strip():
        return None
    try:
        d = json.loads(data.decode("utf-8"))
        return LockInfo(int(d["pid"]), str(d["host"]), str(d["started"]))
    except (ValueError, KeyError, TypeError):
        return LockInfo(-1, "?", "?")


def running_message(stage_name: str, run_dir: Path, info: LockInfo) -> str:
    where = "" if info.alive() is not None else f" (if that process is gone, delete {run_dir / stage_name / LOCK})"
    return f"{stage_name} is running in {run_dir}: {info.describe()}{where}"


def remove_stale_temporaries(stage_dir: Path) -> list[Path]:
    """Delete the temporary files an earlier, killed run left (``.<name>.<random>.tmp``)."""
    removed = []
    for root, _dirs, files in os.walk(stage_dir):
        for f in files:
            if f.startswith(".") and f.endswith(TMP_SUFFIX):
                p = Path(root, f)
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
    return removed


# ----------------------------------------------------------------------------- freshness


class Freshness:
    """Memoised freshness checks of the stages of one run folder under one configuration.

    ``specs`` maps a stage name to an object with ``keys`` (declared configuration keys),
    ``upstream(cfg)``, ``external(cfg)`` and ``folder(run_dir, cfg)``; ``hint(stage)`` gives
    the command a user runs to (re)make a stage.
    """

    def __init__(self, run_dir: Path, cfg: config_mod.Config, specs: dict[str, Any],
                 hint: Callable[[str], str]):
        self.run_dir, self.cfg, self.specs, self.hint = run_dir, cfg, specs, hint
        self._memo: dict[str, str | None] = {}

    def problem(self, name: str) -> str | None:
        """None when ``name`` finished and is unchanged under the configuration; else why not."""
        if name not in self._memo:
            self._memo[name] = self._check(name)
        return self._memo[name]

    def own_problem(self, name: str, manifest: dict | None) -> str | None:
        """Why ``name`` itself (not its upstream) is out of date, given its manifest."""
        spec = self.specs[name]
        sdir = spec.folder(self.run_dir, self.cfg)
        if manifest is None:
            running = holder(sdir)
            if running is not None:
                return running_message(name, self.run_dir, running)
            if (sdir / "log.txt").exists() or (sdir / MANIFEST).exists():
                return f"{name} has not finished in {self.run_dir} (it failed or was interrupted): {self.hint(name)}"
            return f"{name} has not been run in {self.run_dir}: {self.hint(name)}"
        bad = changed_outputs(sdir, manifest)
        if bad:
            return f"{name}'s output {bad} changed or disappeared since it ran"
        old = outdated_store(sdir, manifest)
        if old:  # stage 04 upgrades its store in place; stage 06 writes a new lut.sqlite
            return f"{name}'s output {old} was written by an older version of this tool"
        # a recorded key that is no longer declared or no longer semantic (a speed knob, a key of one
        # command) is no reason to rerun; a key added since counts as its default (what ran before it)
        now = config_mod.key_values(self.cfg, spec.hashed_keys)
        recorded = manifest.get("config", {})
        defaults = config_mod.key_values(config_mod.Config(), [k for k in now if k not in recorded])
        diff = config_mod.diff_values({**defaults, **{k: v for k, v in recorded.items() if k in now}}, now)
        if diff:
            more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
            return f"{name} is out of date: {diff[0]}{more}"
        ext = {str(p): fingerprint_external(p) for p in spec.external(self.cfg)}
        if manifest.get("inputs", {}).get("external", {}) != ext:
            return f"{name} is out of date: its input {', '.join(ext) or 'folder'} changed since it ran"
        recorded = manifest.get("inputs", {}).get("upstream", {})
        if not set(spec.required_upstream(self.cfg)) <= set(recorded) <= set(spec.upstream(self.cfg)):
            return f"{name} is out of date: it read {sorted(recorded)}, the configuration now asks for " \
                   f"{sorted(spec.required_upstream(self.cfg))}"
        for up, rec in recorded.items():
            um = read_manifest(self.specs[up].folder(self.run_dir, self.cfg))
            if um is None or outputs_digest(um) != rec.get("digest"):
                return f"{name} is out of date: {up} was rerun after it"
        return None

    def _check(self, name: str) -> str | None:
        spec = self.specs[name]
        m = read_manifest(spec.folder(self.run_dir, self.cfg))
        if m is not None:
            for up in m.get("inputs", {}).get("upstream", {}):
                why = self.problem(up)
                if why is not None:
                    return why
        why = self.own_problem(name, m)
        if why is not None and m is not None:
            return f"{why}: {self.hint(name)}"
        return why


def utc_stamp() -> str:
    """``20261129T103200Z``: a sortable UTC time for folder names."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def unique_previous(stage_dir: Path) -> Path:
    """A new ``previous-<UTC time>`` folder name under ``stage_dir`` that does not exist yet."""
    base = stage_dir / f"previous-{utc_stamp()}"
    p, i = base, 1
    while p.exists():
        p, i = Path(f"{base}-{i}"), i + 1
    return p


def open_log_nofollow(path: Path) -> int:
    """Open ``path`` for appending without following a symbolic link (``UserError`` if it is one)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link: logs are never written through links; remove it") from None
        raise


def write_manifest(stage_dir: Path, manifest: dict) -> None:
    write_json(stage_dir / MANIFEST, manifest)


# ----------------------------------------------------------------------------- where a stage may write


def _inside_real(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or below it once every existing symbolic link is followed."""
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def check_stage_folder(stage_dir: Path, run_dir: Path, stage_name: str) -> None:
    """``UserError`` unless ``stage_dir`` lies inside ``RUN/<stage_name>/``, written plainly (no
    ``..``) and once links are followed (``07_inference/predict/<name>`` must not lead elsewhere).
    Configured names are plain names already (``config.check_names``); this checks the result."""
    own = Path(run_dir) / stage_name
    rel = os.path.relpath(os.path.abspath(stage_dir), os.path.abspath(own))
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or not _inside_real(stage_dir, own):
        raise UserError(f"{stage_name}: its output folder {stage_dir} is not inside {own} (a link or a name leads "
                        "out of it): refusing to write there")


def _nearest_existing(p: Path) -> Path:
    p = Path(os.path.abspath(p))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def not_writable_message(run_dir: Path, where: Path | str, why: str = "permission denied") -> str:
    """The one line of a run folder this user cannot write."""
    return (f"run folder {run_dir} is not writable ({why}: {where}): give a --run folder you can write, or fix "
            "its permissions")


def check_writable(run_dir: Path, stage_dir: Path) -> None:
    """``UserError`` (one line) when the run folder or the stage folder, or the nearest folder that
    exists above one not created yet, cannot be written by this user, before anything is written."""
    for p in (run_dir, stage_dir):
        q = _nearest_existing(p)
        if not q.is_dir():
            raise UserError(f"run folder {run_dir}: {q} is a file where a folder must be: move it away or give "
                            "another --run folder")
        if not os.access(q, os.W_OK | os.X_OK):
            raise UserError(not_writable_message(run_dir, q))


_NOT_PERMITTED = (errno.EACCES, errno.EPERM, errno.EROFS)


def as_user_error(e: BaseException, run_dir: Path) -> BaseException:
    """A permission error on a file of the run folder, as the one-line ``UserError`` of
    ``not_writable_message`` (exit 2, nothing to look up in a log.txt that may not exist); any
    other exception unchanged."""
    if not isinstance(e, OSError) or e.errno not in _NOT_PERMITTED or not e.filename:
        return e
    name = os.path.abspath(os.fsdecode(e.filename))
    if not _inside_real(Path(name), Path(run_dir)) and not name.startswith(os.path.abspath(run_dir) + os.sep):
        return e
    return UserError(not_writable_message(run_dir, name, e.strerror or "permission denied"))
