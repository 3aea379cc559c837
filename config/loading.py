"""Load the configuration from one TOML file plus ``CARESYNC_*`` environment overrides.

Order of precedence: schema defaults < TOML file < environment. Unknown keys
are rejected before conversion so messages can name them (with a hint), and
msgspec's ``$.section.key`` error paths are turned into dotted keys.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
import typing
import zoneinfo
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

from .errors import ConfigError
from .schema import Config

__all__ = [
    "ENV_PREFIX",
    "RESERVED_ENV_VARS",
    "config_as_dict",
    "dump_defaults_toml",
    "dump_toml",
    "load_config",
]

ENV_PREFIX: Final = "CARESYNC_"
# Read elsewhere (CLI / embedded server); never treated as config overrides.
RESERVED_ENV_VARS: Final = frozenset(
    {"CARESYNC_CONFIG", "CARESYNC_DATA_DIR", "CARESYNC_NATS_SERVER_BIN"}
)
_DEFAULTS_SOURCE: Final = "<defaults>"
_MISSING: Final = object()


def _struct_type(field_type: Any) -> type[msgspec.Struct] | None:
    """The Struct a field holds (a nested table), or None for a plain value."""
    if typing.get_origin(field_type) is typing.Annotated:
        field_type = typing.get_args(field_type)[0]
    if isinstance(field_type, type) and issubclass(field_type, msgspec.Struct):
        return field_type
    return None


def _tables(
    struct: type[msgspec.Struct], path: str = ""
) -> dict[str, dict[str, msgspec.structs.FieldInfo]]:
    """Dotted table path -> field name -> field info, for every table nested in ``struct``."""
    out: dict[str, dict[str, msgspec.structs.FieldInfo]] = {}
    for field in msgspec.structs.fields(struct):
        sub = _struct_type(field.type)
        if sub is not None:
            dotted = f"{path}.{field.name}" if path else field.name
            out[dotted] = {f.name: f for f in msgspec.structs.fields(sub)}
            out.update(_tables(sub, dotted))
    return out


# Dotted table path (``router``, ``downstream.billing``) -> field name -> field info, and
# dotted key of every leaf value -> field info; derived from the schema once.
_TABLES: Final = _tables(Config)
_SCHEMA: Final = {name: fields for name, fields in _TABLES.items() if "." not in name}
_LEAVES: Final = {
    f"{table}.{name}": field
    for table, fields in _TABLES.items()
    for name, field in fields.items()
    if _struct_type(field.type) is None
}
_DOTTED_KEYS: Final = list(_LEAVES)


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Return the validated configuration from ``path`` (optional) and ``environ``.

    ``environ`` defaults to ``os.environ``. Raises ConfigError on any problem.
    """
    env = os.environ if environ is None else environ
    file_source = _DEFAULTS_SOURCE if path is None else str(path)
    merged: dict[str, Any] = {}
    if path is not None:
        data = _read_toml(path)
        _check_known_keys(data, file_source)
        # Copy the tables: environment overrides are merged into them below.
        merged = _copy_tables(data)
    origins = _apply_env(env, merged)
    cfg = _convert(merged, file_source, origins)
    _check_cross_field(cfg, merged, file_source, origins)
    return cfg


def config_as_dict(cfg: Config) -> dict[str, Any]:
    """Return ``cfg`` as plain nested dicts (for JSON output and logging)."""
    result: dict[str, Any] = msgspec.to_builtins(cfg)
    return result


def dump_defaults_toml() -> str:
    """Render the default configuration as a commented TOML document."""
    return dump_toml(Config())


def dump_toml(cfg: Config) -> str:
    """Render ``cfg`` as a commented TOML document that loads back to ``cfg``."""
    lines = [
        "# caresync configuration. Every key is optional; the values shown are in effect.",
        "# Any key can be overridden by the environment: CARESYNC_<SECTION>__<KEY>=value.",
    ]
    for table_name, fields in _TABLES.items():
        table: Any = cfg
        for part in table_name.split("."):
            table = getattr(table, part)
        doc = _table_doc(table_name, table)
        leaves = [name for name in fields if f"{table_name}.{name}" in _LEAVES]
        lines.append("")
        if doc:
            lines.append(f"# {doc[0]}")
        if leaves or "." not in table_name:
            lines.append(f"[{table_name}]")
        for name in leaves:
            lines.append(f"# {_describe_field(fields[name])}")
            lines.append(f"# env: {_env_name(table_name, name)}")
            lines.append(f"{name} = {_toml_value(getattr(table, name))}")
    return "\n".join(lines) + "\n"


def _table_doc(table_name: str, table: object) -> list[str]:
    """A nested table is described by its field in the parent, a section by its docstring."""
    parent, _, name = table_name.rpartition(".")
    if parent:
        description = _field_description(_TABLES[parent][name].type)
        if description:
            return [description]
    return (type(table).__doc__ or "").strip().splitlines()


def _field_description(field_type: Any) -> str:
    if typing.get_origin(field_type) is typing.Annotated:
        for meta in typing.get_args(field_type)[1:]:
            if isinstance(meta, msgspec.Meta) and meta.description:
                return meta.description
    return ""


# --- reading and key checks ---------------------------------------------------


def _read_toml(path: Path) -> dict[str, Any]:
    source = str(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(source, "", "file not found") from None
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(source, "", "invalid TOML: file is not valid UTF-8") from exc
    except tomllib.TOMLDecodeError as exc:
        # The message already carries "(at line L, column C)" when tomllib knows them.
        raise ConfigError(source, "", f"invalid TOML: {exc}") from exc


def _copy_tables(data: Mapping[str, Any]) -> dict[str, Any]:
    """Copy nested tables (not values), so that merging overrides leaves ``data`` alone."""
    return {k: _copy_tables(v) if isinstance(v, dict) else v for k, v in data.items()}


def _check_known_keys(data: Mapping[str, Any], source: str) -> None:
    for section_name, table in data.items():
        fields = _SCHEMA.get(section_name)
        if fields is None:
            if isinstance(table, dict):
                hint = _hint(section_name, list(_SCHEMA), "[{}]")
                raise ConfigError(source, "", f"unknown section [{section_name}]{hint}")
            # A bare top-level key: most likely one that belongs inside a section.
            hint = _hint(section_name, _DOTTED_KEYS, "'{}'") or _hint_elsewhere(section_name)
            raise ConfigError(source, "", f"unknown key '{section_name}'{hint}")
        if not isinstance(table, dict):
            raise ConfigError(source, section_name, f"expected a table, got {table!r}")
        _check_table_keys(section_name, table, source)


def _check_table_keys(table_name: str, table: Mapping[str, Any], source: str) -> None:
    fields = _TABLES[table_name]
    for key, value in table.items():
        dotted = f"{table_name}.{key}"
        if key not in fields:
            hint = _hint(key, list(fields), f"'{table_name}.{{}}'") or _hint_elsewhere(key)
            raise ConfigError(source, "", f"unknown key '{dotted}'{hint}")
        if dotted in _TABLES:
            if not isinstance(value, dict):
                raise ConfigError(source, dotted, f"expected a table, got {value!r}")
            _check_table_keys(dotted, value, source)


def _hint(word: str, candidates: list[str], template: str) -> str:
    """Return a "; did you mean ...?" suffix, or "" when nothing is close."""
    matches = difflib.get_close_matches(word, candidates, n=1)
    return f"; did you mean {template.format(matches[0])}?" if matches else ""


def _hint_elsewhere(key: str) -> str:
    """Hint for a known key placed in the wrong section (or at top level)."""
    for table_name, fields in _TABLES.items():
        if key in fields:
            return f"; did you mean '{table_name}.{key}'?"
    return ""


# --- environment ----------------------------------------------------------------


def _env_name(table: str, key: str) -> str:
    return f"{ENV_PREFIX}{table.replace('.', '__')}__{key}".upper()


def _apply_env(env: Mapping[str, str], merged: dict[str, Any]) -> dict[str, str]:
    """Merge ``CARESYNC_<SECTION>__<KEY>`` values (``__`` between every level) into ``merged``.

    Returns dotted key -> variable name, so later errors can name the variable.
    """
    origins: dict[str, str] = {}
    # Sorted so that conflicting spellings are reported deterministically.
    for var in sorted(env):
        upper = var.upper()
        if not upper.startswith(ENV_PREFIX) or upper in RESERVED_ENV_VARS:
            continue
        parts = upper[len(ENV_PREFIX) :].lower().split("__")
        dotted = ".".join(parts)
        field = _LEAVES.get(dotted)
        if field is None:
            known = [_env_name(*key.rsplit(".", 1)) for key in _LEAVES]
            hint = _hint(upper, known, "{}")
            problem = f"not a known setting (expected {ENV_PREFIX}<SECTION>__<KEY>){hint}"
            raise ConfigError(var, "", problem)
        if dotted in origins:
            raise ConfigError(var, dotted, f"also set by {origins[dotted]}")
        raw = env[var]
        try:
            value = msgspec.convert(raw, field.type, strict=False)
        except msgspec.ValidationError as exc:
            problem = _problem(str(exc), raw, field.type)
            raise ConfigError(var, dotted, problem) from None
        table = merged
        for part in parts[:-1]:
            table = table.setdefault(part, {})
        table[parts[-1]] = value
        origins[dotted] = var
    return origins


# --- conversion and validation ------------------------------------------------------

_ERROR_PATH = re.compile(r"^(?P<message>.*) - at `\$(?P<path>[^`]*)`$", re.DOTALL)
_EXPECTED = re.compile(r"^Expected (?P<expected>.*?)(?:, got `[^`]*`)?$", re.DOTALL)


def _convert(merged: dict[str, Any], file_source: str, origins: dict[str, str]) -> Config:
    try:
        # strict: a TOML file has real types, so "500" for an int is a mistake there.
        return msgspec.convert(merged, Config, strict=True)
    except msgspec.ValidationError as exc:
        match = _ERROR_PATH.match(str(exc))
        if match is None:
            raise ConfigError(file_source, "", str(exc)) from None
        parts = [p for p in match["path"].split(".") if p]
        dotted = ".".join(parts)
        value: object = merged
        for part in parts:
            value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        field_type = _field_type(parts)
        problem = _problem(match["message"], value, field_type)
        raise ConfigError(origins.get(dotted, file_source), dotted, problem) from None


def _field_type(parts: list[str]) -> Any:
    field = _LEAVES.get(".".join(parts))
    return None if field is None else field.type


def _problem(message: str, value: object, field_type: Any) -> str:
    """Turn a msgspec message into ``expected <what>, got <value>``."""
    message = _ERROR_PATH.sub(r"\g<message>", message)
    got = "" if value is _MISSING else f", got {value!r}"
    options = _literal_values(field_type)
    if options:
        return f"expected one of {', '.join(map(repr, options))}{got}"
    match = _EXPECTED.match(message)
    if match:
        return f"expected {match['expected'].replace('`', '')}{got}"
    return message[:1].lower() + message[1:].replace("`", "") + got


def _literal_values(field_type: Any) -> tuple[object, ...]:
    if typing.get_origin(field_type) is typing.Annotated:
        field_type = typing.get_args(field_type)[0]
    if typing.get_origin(field_type) is Literal:
        return typing.get_args(field_type)
    return ()


def _check_cross_field(
    cfg: Config, merged: dict[str, Any], file_source: str, origins: dict[str, str]
) -> None:
    def fail(key: str, other: str, problem: str) -> typing.NoReturn:
        # Blame whichever of the two keys the user actually set, preferring `key`.
        source = file_source
        for candidate in (key, other):
            if candidate in origins:
                source = origins[candidate]
                break
            if _is_set(merged, candidate):
                break
        raise ConfigError(source, key, problem)

    retention_s, window_s = cfg.store.dedupe_retention_s, cfg.streams.duplicate_window_s
    if retention_s <= window_s:
        fail(
            "store.dedupe_retention_s",
            "streams.duplicate_window_s",
            f"must be greater than streams.duplicate_window_s ({window_s!r})"
            f" so dedupe outlives JetStream's duplicate window, got {retention_s!r}",
        )
    max_age_s = cfg.streams.max_age_s
    if max_age_s > 0 and window_s > max_age_s:
        # JetStream rejects a stream whose duplicate window exceeds its max age.
        fail(
            "streams.duplicate_window_s",
            "streams.max_age_s",
            f"must not exceed streams.max_age_s ({max_age_s!r}), got {window_s!r}",
        )
    if cfg.router.processes > cfg.streams.partitions:
        fail(
            "router.processes",
            "streams.partitions",
            f"must not exceed streams.partitions ({cfg.streams.partitions!r}): a process runs"
            f" whole partitions, got {cfg.router.processes!r}",
        )
    sup = cfg.supervision
    if sup.backoff_initial_ms > sup.backoff_max_ms:
        fail(
            "supervision.backoff_initial_ms",
            "supervision.backoff_max_ms",
            f"must not exceed supervision.backoff_max_ms ({sup.backoff_max_ms!r}),"
            f" got {sup.backoff_initial_ms!r}",
        )
    out = cfg.outbox
    if out.retry_backoff_initial_ms > out.retry_backoff_max_ms:
        fail(
            "outbox.retry_backoff_initial_ms",
            "outbox.retry_backoff_max_ms",
            f"must not exceed outbox.retry_backoff_max_ms ({out.retry_backoff_max_ms!r}),"
            f" got {out.retry_backoff_initial_ms!r}",
        )
    try:
        if cfg.ingest.hl7_timezone != "UTC":
            zoneinfo.ZoneInfo(cfg.ingest.hl7_timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        fail(
            "ingest.hl7_timezone",
            "ingest.hl7_timezone",
            f"must be an IANA time zone such as 'America/Chicago' or 'UTC',"
            f" got {cfg.ingest.hl7_timezone!r}",
        )
    for system in ("billing", "erp", "supply"):
        conn = getattr(cfg.downstream, system)
        table = f"downstream.{system}"
        if conn.backoff_initial_ms > conn.backoff_max_ms:
            fail(
                f"{table}.backoff_initial_ms",
                f"{table}.backoff_max_ms",
                f"must not exceed {table}.backoff_max_ms ({conn.backoff_max_ms!r}),"
                f" got {conn.backoff_initial_ms!r}",
            )
        if conn.enabled and conn.transport == "http" and not conn.url:
            fail(
                f"{table}.url",
                f"{table}.transport",
                f'must be set when {table}.transport is "http", got ""',
            )


def _is_set(merged: Mapping[str, Any], dotted: str) -> bool:
    """Whether the file or environment gave ``dotted`` a value."""
    value: Any = merged
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return False
        value = value[part]
    return True


# --- TOML rendering -------------------------------------------------------------


def _describe_field(field: msgspec.structs.FieldInfo) -> str:
    field_type = field.type
    description = ""
    bounds: list[str] = []
    if typing.get_origin(field_type) is typing.Annotated:
        field_type, *metas = typing.get_args(field_type)
        for meta in metas:
            if not isinstance(meta, msgspec.Meta):
                continue
            description = meta.description or description
            if meta.ge is not None and meta.le is not None:
                bounds.append(f"{meta.ge}..{meta.le}")
            elif meta.ge is not None:
                bounds.append(f">= {meta.ge}")
            elif meta.gt is not None:
                bounds.append(f"> {meta.gt}")
    options = _literal_values(field_type)
    if options:
        bounds.append("one of " + ", ".join(_toml_value(o) for o in options))
    return description + (f" ({'; '.join(bounds)})" if bounds else "")


def _toml_value(value: object) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    raise TypeError(f"cannot render {type(value).__name__} as TOML")


def _toml_string(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in {'"', "\\"}:
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            # TOML forbids raw control characters in basic strings.
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)
