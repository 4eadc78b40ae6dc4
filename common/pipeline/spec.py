"""What a stage is to the machinery: StageSpec (keys, upstream, folder, driver), script names and rerun
hints."""
from __future__ import annotations

import importlib
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config.schema import Config
from ..config.values import hashed_for


def script_for(stage_name: str) -> str:
    """The script that produces a stage, e.g. ``03_main_supcon.py``."""
    return f"{stage_name}.py"


# ----------------------------------------------------------------------------- checks


def rerun_hint(stage_name: str, run_dir: Path, extra: Sequence[str] = ()) -> str:
    words = ["python", script_for(stage_name), "--run", str(run_dir), *extra]
    return f"run `{shlex.join(words)}`"


def downstream(table: dict[str, StageSpec], names: set[str], cfg: Config) -> list[str]:
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


@dataclass(frozen=True)
class StageSpec:
    """One stage: its name, driver, upstream stages and the configuration keys it reads."""

    name: str
    # the module holding main(ctx) and maybe check(ctx) ("common.stages.split", imported when the
    # stage runs), or any object with those attributes (a test's driver)
    driver: Any
    keys: tuple[str, ...]  # section.key read by the driver (keys declared hashed=False are read but not hashed)
    upstream_fn: Callable[[Config], tuple[str, ...]] = lambda cfg: ()
    optional_upstream: tuple[str, ...] = ()  # read when present and fresh; never required
    external_fn: Callable[[Config], list[str]] = lambda cfg: []
    folder_fn: Callable[[Path, Config], Path] | None = None
    aliases: dict[str, str] = field(default_factory=dict)  # --flag -> section.key (stage 03)
    switches: frozenset[str] = frozenset()  # of ``aliases``, the on/off flags (``--cosine``: true)

    @property
    def hashed_keys(self) -> tuple[str, ...]:
        """The keys whose values make this stage's outputs (recorded and compared for freshness):
        those of ``keys`` whose declaration hashes them for this stage (``config.values.hashed_for``)."""
        return tuple(k for k in self.keys if hashed_for(k, self.name))

    def upstream(self, cfg: Config) -> tuple[str, ...]:
        return tuple(self.upstream_fn(cfg)) + tuple(u for u in self.optional_upstream)

    def required_upstream(self, cfg: Config) -> tuple[str, ...]:
        return tuple(self.upstream_fn(cfg))

    def external(self, cfg: Config) -> list[str]:
        return list(self.external_fn(cfg))

    def folder(self, run_dir: Path, cfg: Config) -> Path:
        return self.folder_fn(run_dir, cfg) if self.folder_fn else Path(run_dir) / self.name

    def _driver(self) -> Any:
        return importlib.import_module(self.driver) if isinstance(self.driver, str) else self.driver

    def main(self) -> Callable[[Any], dict | None]:
        return self._driver().main

    def check(self) -> Callable[[Any], None] | None:
        """The driver's ``check(ctx)``, if it has one: read-only checks run before anything is written."""
        return getattr(self._driver(), "check", None)
