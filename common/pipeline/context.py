"""What a driver gets: the configuration, its stage folder, upstream folders, rank, and where outputs
go."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.schema import Config
from ..errors import StaleUpstreamError
from .freshness import Freshness
from .manifest import outputs_digest, read_manifest

# ----------------------------------------------------------------------------- context


@dataclass
class Context:
    """What a stage's ``main`` gets: configuration, its folder, and access to upstream stages."""

    name: str
    cfg: Config
    run_dir: Path
    dir: Path
    freshness: Freshness
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
        m = read_manifest(folder)
        assert m is not None
        self.used[stage_name] = outputs_digest(m)
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
            from ..runtime.device import resolve_device

            self._device = resolve_device(self.freshness.cfg.run.device)
        return self._device
