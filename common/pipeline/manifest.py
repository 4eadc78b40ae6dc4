"""manifest.json: what a finished stage records (keys, upstream digests, outputs' sha256, versions) and
its reader."""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..config.values import hash_values, key_values
from ..fileio import read_json, sha256_file, write_json

if TYPE_CHECKING:
    from .spec import StageSpec
from .cli import _redact_argv
from .spec import script_for

if TYPE_CHECKING:
    from .cli import Invocation
    from .context import Context

log = logging.getLogger(__name__)


MANIFEST = "manifest.json"
FORMAT = "plankton-manifest/2"


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
        from ..store.maintenance import content_digest
        from ..store.postgres import PgStore

        rec = (json.loads(Path(path).read_text(encoding="utf-8")).get("store") or {})
        target = PgStore.from_record(rec)
        if target is not None:
            now = content_digest(target)
            if now != rec.get("digest"):
                return f"store changed: {now}"
        return sha256_file(path)
    if kind == "feature_store":
        from ..store.maintenance import content_digest

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


def write_manifest(stage_dir: Path, manifest: dict) -> None:
    write_json(stage_dir / MANIFEST, manifest)

REPO_ROOT = Path(__file__).resolve().parents[2]


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
        from ..runtime.device import describe

        return describe(ctx.device())
    except Exception:  # noqa: BLE001 - a device problem must not stop the manifest
        return None


# ----------------------------------------------------------------------------- signals and processes


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _manifest(spec: StageSpec, inv: Invocation, ctx: Context, reads: set[str], argv: Sequence[str], started: str,
              t0: float, metrics: dict) -> dict[str, Any]:
    """``manifest.json``: what ran, on what, with which declared keys, and every output's digest."""
    values = key_values(inv.cfg, spec.hashed_keys)
    return {
        "format": FORMAT, "stage": spec.name, "status": "ok", "started": started, "finished": _now(),
        "elapsed_s": round(time.time() - t0, 3), "argv": _redact_argv([script_for(spec.name), *argv]),
        "host": socket.gethostname(), "git_commit": git_commit(),
        "config": values, "config_hash": hash_values(values),
        "keys_read": sorted(reads), "undeclared_keys_read": sorted(reads - set(spec.keys)),
        "seed": inv.cfg.run.seed, "world_size": ctx.world_size, "device": _device_text(ctx),
        "versions": library_versions(),
        "inputs": {"upstream": {up: {"digest": d} for up, d in sorted(ctx.used.items())},
                   "external": {str(p): fingerprint_external(p) for p in spec.external(inv.cfg)}},
        "outputs": record_outputs(ctx.dir, ctx.outputs), "metrics": metrics,
    }
