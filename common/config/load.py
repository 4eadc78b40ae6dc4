"""Loading a configuration: safe YAML (size and alias limits), defaults then files then overrides,
did-you-mean errors, paths made absolute."""
from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ..errors import ConfigError
from .keys import _cut, _show
from .schema import PATH_KEYS, SECTIONS, Config, get_key, strip_empty_password, validate
from .secrets import NOT_SHOWN, _may_hold_secret, _show_arg, holds_secret


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` checked (and losslessly widened, int -> float) against ``tp``."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)} ({type(value).__name__})")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. trial: 3
        raise bad
    raise bad  # pragma: no cover - every field type is handled above


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _apply(cfg: Config, section: str, key: str, value: Any, origin: str) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {NOT_SHOWN if _may_hold_secret(section, name=True) else _show(section)} in {origin}{_suggest(section, list(SECTIONS))}")
    sec_obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(sec_obj))
    if key not in hints:
        raise ConfigError(
            f"unknown config key {_show_arg(f'{section}.{key}', name=True)} in {origin}{_suggest(key, list(hints))}"
        )
    dotted = f"{section}.{key}"
    try:
        setattr(sec_obj, key, _coerce(value, hints[key], dotted))
    except ConfigError:
        if not holds_secret(dotted):
            raise
        raise ConfigError(f"{dotted}: expected {_type_name(hints[key])}, got a {type(value).__name__} "
                          f"(in {origin}; the value is not shown: it may hold a secret)") from None


def _merge_mapping(cfg: Config, data: Any, origin: str) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections")
    for section, body in data.items():
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{_show_arg(str(section), name=True)}: expected a mapping of keys in {origin}, got a "
                              f"{type(body).__name__}")
        for key, value in body.items():
            _apply(cfg, str(section), str(key), value, origin)


# ----------------------------------------------------------------------------- YAML

MAX_YAML_ALIAS_VALUES = 100_000  # values that aliases add to one YAML document once expanded ("billion laughs")
MAX_YAML_DEPTH = 32  # nesting levels of one YAML document (a configuration needs four)
MAX_CONFIG_BYTES = 16 * 2**20  # a -c file larger than this is refused before it is read (a configuration is a few KiB)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that composes at most ``MAX_YAML_DEPTH`` nesting levels: a deeper
    document is refused at level ``MAX_YAML_DEPTH + 1``, so the work done on it is bounded by that
    depth, never by the file's length or Python's recursion limit."""

    def __init__(self, stream: str, origin: str):
        super().__init__(stream)
        self._depth, self._origin = 0, origin

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self._depth >= MAX_YAML_DEPTH:
            raise ConfigError(f"{self._origin}: YAML nested deeper than {MAX_YAML_DEPTH} levels: refusing to load it")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_yaml_graph(root: yaml.Node, origin: str) -> None:
    """Refuse a composed YAML document whose aliases add more than ``MAX_YAML_ALIAS_VALUES`` values
    once expanded ("billion laughs") or whose alias refers to the value that contains it.

    What counts is what aliases add (expanded size minus the nodes written in the text), never
    the document's own length: a plain list of 200,000 values adds nothing. Aliases share nodes,
    so each node's expanded size is computed once (time linear in the text); an alias always
    follows its anchor, so the walk never goes deeper than the text nests (``_BoundedLoader``).
    """
    sizes: dict[int, int] = {}  # id(node) -> expanded size; -1 while the node is being visited

    def size(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            if known < 0:
                raise ConfigError(f"{origin}: a YAML alias refers to the value that contains it: refusing to load it")
            return known
        sizes[id(node)] = -1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        total = 1 + sum(size(child) for child in children)
        sizes[id(node)] = total
        return total

    added = size(root) - len(sizes)
    if added > MAX_YAML_ALIAS_VALUES:
        raise ConfigError(f"{origin}: YAML aliases expand to more than {MAX_YAML_ALIAS_VALUES} values "
                          "(a \"billion laughs\" file?): refusing to load it")


def load_yaml(text: str, origin: str) -> Any:
    """Parse one YAML document with the safe loader, checking its nesting while composing it and
    what its aliases expand to before building it.

    Raises ``ConfigError`` naming ``origin`` for an alias bomb, a self-referring alias or too deep
    nesting; ``yaml.YAMLError`` for a syntax error.
    """
    loader = _BoundedLoader(text, origin)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:  # not expected (the depth is bounded): kept as a last guard
            raise ConfigError(f"{origin}: YAML nested too deeply: refusing to load it") from None
        if node is None:
            return None
        _check_yaml_graph(node, origin)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split ``section.key=value`` and parse the value as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {_show_arg(text)} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {_show_arg(dotted, name=True)} must look like section.key")
    try:
        value = load_yaml(raw, f"command-line override {_cut(dotted.strip())}") if raw.strip() != "" else None
    except yaml.YAMLError as e:
        shown = "" if holds_secret(dotted.strip()) else f" {_show(raw)}"
        raise ConfigError(f"{_cut(dotted)}: cannot parse value{shown} as YAML ({e.__class__.__name__})") from None
    return parts[0], parts[1], value


def load_config(files: list[str | Path] | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None, base_origin: str = "run configuration") -> Config:
    """Defaults, then ``base`` (a run's own config.yaml), each YAML file in order, then overrides.

    Path-valued keys are made absolute (``resolve_paths``) before the checks.
    """
    cfg = Config()
    if base is not None:
        _merge_mapping(cfg, base, base_origin)
    for f in files or []:
        p = Path(f)
        if p.is_dir():
            raise ConfigError(f"config file {p} is a folder, not a file")
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        if not p.is_file():
            raise ConfigError(f"config file {p} is not a regular file")
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {p} is larger than {MAX_CONFIG_BYTES // 2**20} MiB: not a configuration")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not UTF-8 text") from None
        except OSError as e:
            raise ConfigError(f"config file {p} cannot be read ({e.strerror})") from None
        try:
            data = load_yaml(text, str(p))
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({_cut(str(e).splitlines()[0])})") from None
        _merge_mapping(cfg, data, str(p))
    for o in overrides or []:
        section, key, value = parse_override(o)
        _apply(cfg, section, key, value, "command line")
    resolve_paths(cfg)
    if cfg.store.url:
        cfg.store.url = strip_empty_password(cfg.store.url)
    validate(cfg)
    return cfg


def from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict()`` output (e.g. the copy stored in a checkpoint)."""
    cfg = Config()
    _merge_mapping(cfg, d, "stored configuration")
    return cfg


def resolve_paths(cfg: Config, cwd: str | Path | None = None) -> None:
    """Make every path-valued key absolute (``PATH_KEYS``), in place."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    def absolute(v: Any) -> str:
        return str((base / Path(str(v)).expanduser()).resolve())

    for dotted, keywords in PATH_KEYS.items():
        v = get_key(cfg, dotted)
        section, key = dotted.split(".")
        if isinstance(v, list):  # a list of paths (data.gallery_extra)
            setattr(getattr(cfg, section), key, [absolute(x) for x in v])
            continue
        if not v or str(v).lower() in keywords:
            continue
        setattr(getattr(cfg, section), key, absolute(v))
