"""The read-only check phase: upstream stages fresh, inputs present, the stage's own state; nothing is
written."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..config.schema import Config, get_key
from ..config.values import is_semantic
from ..errors import StaleUpstreamError, UserError
from . import manifest as pipeline_manifest
from .freshness import Freshness
from .lock import holder, running_message
from .manifest import read_manifest
from .runconfig import RUN_CONFIG

if TYPE_CHECKING:
    from .spec import StageSpec
from .spec import downstream, rerun_hint, stages_reading

if TYPE_CHECKING:
    from .cli import Invocation

log = logging.getLogger(__name__)


def _check_upstream(spec: StageSpec, inv: Invocation, fresh: Freshness, specs: dict[str, StageSpec]) -> None:
    """Raise ``StaleUpstreamError`` naming the stage to run when an upstream is not usable."""
    for up in spec.upstream(inv.cfg):
        folder = specs[up].folder(inv.run_dir, inv.cfg)
        running = holder(folder)
        if running is not None:
            raise StaleUpstreamError(f"{spec.name} needs {up}, which is running: "
                                     f"{running_message(up, inv.run_dir, running)}")
        if up in spec.optional_upstream:
            continue
        why = fresh.problem(up)
        if why is not None:
            raise StaleUpstreamError(why)


def _check_external(spec: StageSpec, cfg: Config) -> None:
    """An input outside the run folder (``data.root``, ``inference.input``...) must exist before anything is written."""
    for p in spec.external(cfg):
        try:
            problem = None if Path(p).exists() else "does not exist"
        except OSError as e:  # a name too long for the file system, a path through a file...
            problem = f"cannot be read ({e.strerror or e.__class__.__name__})"
        if problem is not None:
            values = {k: get_key(cfg, k) for k in spec.keys}
            keys = [k for k, v in values.items() if str(p) == v or (isinstance(v, list) and str(p) in v)]
            raise UserError(f"{keys[0] if keys else 'input'}: {str(p)[:200]} {problem}")


def _check_stage_folder(stage_dir: Path) -> None:
    """What the wrapper will write in the stage folder can be written: ``log.txt`` is not a link."""
    log_txt = stage_dir / "log.txt"
    if log_txt.is_symlink():
        raise UserError(f"{log_txt} is a symbolic link: logs are never written through links; remove it")


def _own_state(spec: StageSpec, inv: Invocation, fresh: Freshness, stage_dir: Path
               ) -> tuple[dict | None, str | None]:
    """(the last finished run's manifest or None, why this stage runs; None = it is up to date)."""
    old = read_manifest(stage_dir)
    if old is None:
        why = "not run yet" if not (stage_dir / "log.txt").exists() else \
            "the last run did not finish: continuing it"
        return None, why
    if old.get("format") != pipeline_manifest.FORMAT:
        return old, "its manifest is of an older version of this tool"
    why = fresh.own_problem(spec.name, old)
    if why is None and inv.force:
        why = "--force"
    return old, why


def _config_change_message(inv: Invocation, specs: dict[str, StageSpec]) -> str:
    keys = {c.split(":")[0] for c in inv.changes}
    affected = downstream(specs, stages_reading(specs, {k for k in keys if is_semantic(k)}), inv.cfg)
    stale = [s for s in affected if s in specs and read_manifest(specs[s].folder(inv.run_dir, inv.cfg))]
    tail = f"; out of date now: {', '.join(stale)}" if stale else "; no finished stage is affected"
    return f"{inv.run_dir / RUN_CONFIG}: " + "; ".join(inv.changes) + tail


def _checks(spec: StageSpec, inv: Invocation, specs: dict[str, StageSpec], stage_dir: Path, rank0: bool
            ) -> tuple[Freshness, dict | None, str | None]:
    """Read-only checks: (freshness, the last finished run's manifest, why the stage runs; None = up to date).

    Raises ``UserError`` when the stage must not run (its lock is held, an upstream is not usable).
    """
    hint_extra = inv.args if inv.changes else []
    fresh = Freshness(inv.run_dir, inv.cfg, specs, lambda s: rerun_hint(s, inv.run_dir, hint_extra))
    if rank0:
        running = holder(stage_dir)
        if running is not None:
            raise UserError(running_message(spec.name, inv.run_dir, running))
    _check_upstream(spec, inv, fresh, specs)
    _check_external(spec, inv.cfg)
    old, why = _own_state(spec, inv, fresh, stage_dir)
    return fresh, old, why
