"""Is a stage up to date: its manifest against today's keys, upstream digests and outputs.

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

import json
import logging
from pathlib import Path
from typing import Any, Callable

from ..config.schema import Config
from ..config.values import diff_values, key_values
from .lock import holder, running_message
from .manifest import MANIFEST, changed_outputs, fingerprint_external, outputs_digest, read_manifest

log = logging.getLogger(__name__)


def outdated_store(stage_dir: Path, manifest: dict) -> str | None:
    """The first recorded feature store (``feature_store`` or ``store_ref`` output) that a former
    version of this tool wrote (an older schema version), as ``"<output> (schema version N, ...)"``;
    else None. One ``meta`` row read per store; a store that cannot be read is left to
    ``changed_outputs``."""
    from ..store.maintenance import schema_version
    from ..store.postgres import PgStore
    from ..store.schema import SCHEMA_VERSION

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


# ----------------------------------------------------------------------------- freshness


class Freshness:
    """Memoised freshness checks of the stages of one run folder under one configuration.

    ``specs`` maps a stage name to an object with ``keys`` (declared configuration keys),
    ``upstream(cfg)``, ``external(cfg)`` and ``folder(run_dir, cfg)``; ``hint(stage)`` gives
    the command a user runs to (re)make a stage.
    """

    def __init__(self, run_dir: Path, cfg: Config, specs: dict[str, Any],
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
        now = key_values(self.cfg, spec.hashed_keys)
        recorded = manifest.get("config", {})
        defaults = key_values(Config(), [k for k in now if k not in recorded])
        diff = diff_values({**defaults, **{k: v for k, v in recorded.items() if k in now}}, now)
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
