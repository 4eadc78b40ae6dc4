"""A stage's command line: -c files, --run, --force, section.key=value overrides; argv recorded without
secrets."""
from __future__ import annotations

import argparse
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..config import secrets as config_secrets
from ..config.load import load_config
from ..config.schema import SECTIONS, Config
from ..config.secrets import NOT_SHOWN, is_secret_key, secret_args
from .runconfig import RUN_CONFIG, read_run_config, run_config_changes

if TYPE_CHECKING:
    from .spec import StageSpec
from .spec import script_for

# ----------------------------------------------------------------------------- command line


@dataclass
class Invocation:
    """A parsed stage command line and the configuration it resolves to."""

    cfg: Config
    run_dir: Path
    force: bool
    changes: list[str]  # keys this command changes in RUN/config.yaml ("key: old -> new")
    new_run: bool  # RUN/config.yaml does not exist yet
    args: list[str]  # the -c and override arguments (for hints)


def _alias_value(target: str, raw: str) -> str:
    """``--lr_decay_epochs 700,800,900`` -> a YAML list when the key holds a list."""
    sec, key = target.split(".")
    tp = typing.get_type_hints(SECTIONS[sec])[key]
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
            message = head + sep + " ".join(NOT_SHOWN if w in self.hidden else w for w in rest.split(" "))
        super().error(message)


KEYS_LINE = "Every key, its default and its meaning: configs/default.yaml."


def _usage_block(doc: str | None) -> str:
    """The ``Usage:`` lines of a script's docstring (its examples, e.g. stage 07's predict mode)."""
    lines = (doc or "").strip().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Usage:")), None)
    return "\n".join(lines[start:]).rstrip() + "\n\n" if start is not None else ""


def build_parser(spec: StageSpec, doc: str | None) -> argparse.ArgumentParser:
    p = ArgParser(
        prog=script_for(spec.name),
        description=(doc or "").strip().splitlines()[0] if doc else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_usage_block(doc) + "Overrides: section.key=value (values parse as YAML), e.g. train.epochs=10;\n"
        "options and overrides in any order. " + KEYS_LINE + "\nExit codes: 0 done, 2 bad input or configuration, "
        "1 unexpected failure, 130 interrupted.",
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
    parser.hidden = secret_args(argv)
    args = parser.parse_intermixed_args(list(argv))
    overrides = []
    for flag, target in spec.aliases.items():
        v = getattr(args, f"alias__{flag}")
        if v is not None:
            overrides.append(f"{target}={'true' if v is True else _alias_value(target, v)}")
    overrides += list(args.overrides)  # explicit key=value wins over aliases
    first = load_config(args.config, overrides)
    run_dir = Path(args.run) if args.run else Path(first.run.dir)
    saved = read_run_config(run_dir)
    if saved is None:
        cfg, changes = first, []
    else:
        cfg = load_config(args.config, overrides, base=saved,
                                     base_origin=str(run_dir / RUN_CONFIG))
        changes = run_config_changes(saved, cfg)
    cfg.run.dir = str(run_dir)
    hint_args = [x for c in args.config for x in ("-c", c)] + [a for a in argv if "=" in a and not a.startswith("-")]
    return Invocation(cfg, run_dir, bool(args.force), changes, saved is None, hint_args)


def _redact_argv(argv: Sequence[str]) -> list[str]:
    out = []
    for a in argv:
        key = a.split("=", 1)[0]
        if "=" in a and is_secret_key(key):
            out.append(f"{key}={config_secrets.REDACTED}")
        else:
            out.append(a)
    return out
