"""Tests for caresync.config: TOML file + CARESYNC_* environment overrides."""

from __future__ import annotations

import pickle
import tomllib
from pathlib import Path

import pytest

from caresync.config import (
    Config,
    ConfigError,
    RouterConfig,
    config_as_dict,
    dump_defaults_toml,
    dump_toml,
    load_config,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "caresync.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_file_or_environment() -> None:
    cfg = load_config(None, environ={})
    assert cfg == Config()
    assert cfg.nats.url == ""
    assert cfg.router.batch_size == 2000
    assert cfg.streams.storage == "file"
    assert cfg.store.path == "caresync.db"


def test_file_values_apply_and_missing_keys_keep_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [nats]
        url = "nats://example:4222"
        [router]
        batch_size = 1000
        ack_wait_s = 30  # an int is fine for a float field
        [streams]
        subject_prefix = "cs.prod"
        storage = "memory"
        """,
    )
    cfg = load_config(path, environ={})
    assert cfg.nats.url == "nats://example:4222"
    assert cfg.router.batch_size == 1000
    assert cfg.router.ack_wait_s == 30.0
    assert cfg.streams.subject_prefix == "cs.prod"
    assert cfg.streams.storage == "memory"
    assert cfg.router.batches_in_flight == RouterConfig().batches_in_flight


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[router]\nbatch_size = 1000\n[nats]\nurl = 'nats://file:4222'\n")
    environ = {
        "CARESYNC_ROUTER__BATCH_SIZE": "2000",
        "caresync_nats__url": "nats://env:4222",  # case-insensitive
        "CARESYNC_STREAMS__DUPLICATE_WINDOW_S": "30.5",
        "CARESYNC_LOG__FORMAT": "console",
        "UNRELATED": "x",
    }
    cfg = load_config(path, environ=environ)
    assert cfg.router.batch_size == 2000
    assert cfg.nats.url == "nats://env:4222"
    assert cfg.streams.duplicate_window_s == 30.5
    assert cfg.log.format == "console"


def test_unknown_key_in_file_is_named_with_hint(tmp_path: Path) -> None:
    path = write(tmp_path, "[router]\nbatch_sise = 10\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.source == str(path)
    assert str(info.value) == (
        f"{path}: unknown key 'router.batch_sise'; did you mean 'router.batch_size'?"
    )


def test_key_in_wrong_section_hints_the_right_one(tmp_path: Path) -> None:
    path = write(tmp_path, "[router]\nmax_failures = 3\n")
    with pytest.raises(ConfigError, match=r"'router.max_failures'.*'supervision.max_failures'"):
        load_config(path, environ={})


def test_unknown_section_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "[rooter]\nbatch_size = 10\n")
    with pytest.raises(ConfigError, match=r"unknown section \[rooter\]; did you mean \[router\]"):
        load_config(path, environ={})


def test_section_that_is_not_a_table_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "router = 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.key == "router"
    assert "expected a table" in info.value.problem


def test_unknown_caresync_variable_is_named() -> None:
    environ = {"CARESYNC_ROUTER_BATCH_SIZE": "10"}
    with pytest.raises(ConfigError) as info:
        load_config(None, environ=environ)
    assert info.value.source == "CARESYNC_ROUTER_BATCH_SIZE"
    assert "did you mean CARESYNC_ROUTER__BATCH_SIZE?" in str(info.value)


def test_reserved_variables_are_ignored() -> None:
    environ = {
        "CARESYNC_CONFIG": "/etc/caresync.toml",
        "CARESYNC_DATA_DIR": "/var/lib/caresync",
        "CARESYNC_NATS_SERVER_BIN": "/usr/bin/nats-server",
    }
    assert load_config(None, environ=environ) == Config()


def test_wrong_type_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[router]\nbatch_size = 'many'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    err = info.value
    assert (err.source, err.key) == (str(path), "router.batch_size")
    assert str(err) == f"{path}: router.batch_size: expected int, got 'many'"


def test_wrong_type_from_environment_names_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"CARESYNC_ROUTER__BATCH_SIZE": "abc"})
    assert str(info.value) == (
        "CARESYNC_ROUTER__BATCH_SIZE: router.batch_size: expected int, got 'abc'"
    )


def test_constraint_violation(tmp_path: Path) -> None:
    path = write(tmp_path, "[router]\nbatch_size = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value) == f"{path}: router.batch_size: expected int >= 1, got 0"


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("streams", "storage", "'disk'"),
        ("streams", "subject_prefix", "'cs.*'"),
        ("streams", "stream_prefix", "'CARE.SYNC'"),
        ("streams", "partitions", "65"),
        ("nats", "connect_timeout_s", "0"),
    ],
)
def test_invalid_values_are_rejected(tmp_path: Path, section: str, key: str, value: str) -> None:
    path = write(tmp_path, f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.key == f"{section}.{key}"
    assert info.value.problem.startswith("expected ")


def test_literal_error_lists_choices(tmp_path: Path) -> None:
    path = write(tmp_path, "[streams]\nstorage = 'disk'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.problem == "expected one of 'file', 'memory', got 'disk'"


def test_dedupe_retention_must_outlive_duplicate_window(tmp_path: Path) -> None:
    path = write(
        tmp_path, "[streams]\nduplicate_window_s = 600.0\n[store]\ndedupe_retention_s = 600.0\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.key == "store.dedupe_retention_s"
    assert info.value.source == str(path)
    assert "streams.duplicate_window_s" in info.value.problem


def test_cross_field_error_blames_the_environment_variable_that_set_it() -> None:
    environ = {"CARESYNC_STREAMS__DUPLICATE_WINDOW_S": "1e9"}
    with pytest.raises(ConfigError) as info:
        load_config(None, environ=environ)
    assert info.value.key == "store.dedupe_retention_s"
    assert info.value.source == "CARESYNC_STREAMS__DUPLICATE_WINDOW_S"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[supervision]\nbackoff_initial_ms = 3000.0\n", "supervision.backoff_initial_ms"),
        ("[outbox]\nretry_backoff_max_ms = 10.0\n", "outbox.retry_backoff_initial_ms"),
        ("[streams]\nmax_age_s = 60.0\n", "streams.duplicate_window_s"),
    ],
)
def test_other_cross_field_rules(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ={})
    assert info.value.key == key


def test_invalid_toml_names_file_and_position(tmp_path: Path) -> None:
    path = write(tmp_path, "[router]\nbatch_size = \n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.source == str(path)
    assert str(info.value).startswith(f"{path}: invalid TOML: ")
    assert "line 2" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value) == f"{path}: file not found"


def test_dump_defaults_round_trips(tmp_path: Path) -> None:
    text = dump_defaults_toml()
    parsed = tomllib.loads(text)
    assert parsed == config_as_dict(Config())
    assert "# env: CARESYNC_ROUTER__BATCH_SIZE" in text
    assert load_config(write(tmp_path, text), environ={}) == Config()


def test_dump_toml_round_trips_non_defaults(tmp_path: Path) -> None:
    environ = {
        "CARESYNC_NATS__NAME": 'we "quote"\\ and\ttab',
        "CARESYNC_ROUTER__IDLE_PASSIVATE_S": "1e-05",
        "CARESYNC_STREAMS__PARTITIONS": "8",
    }
    cfg = load_config(None, environ=environ)
    assert load_config(write(tmp_path, dump_toml(cfg)), environ={}) == cfg


def test_config_error_is_picklable() -> None:
    err = ConfigError("caresync.toml", "router.batch_size", "expected int, got 'x'")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.source, copy.key, copy.problem, str(copy)) == (
        err.source,
        err.key,
        err.problem,
        str(err),
    )


# --- nested tables: [downstream.<system>] --------------------------------------------------------


def test_downstream_defaults() -> None:
    cfg = load_config(None, environ={})
    for system in (cfg.downstream.billing, cfg.downstream.erp, cfg.downstream.supply):
        assert (system.transport, system.subject_prefix, system.enabled) == ("nats", "sim", True)
        assert (system.timeout_s, system.max_attempts) == (5.0, 0)


def test_downstream_from_file_and_nested_environment_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [downstream.billing]
        transport = "http"
        url = "https://billing.example/api"
        timeout_s = 9.0
        [downstream.erp]
        max_attempts = 5
        """,
    )
    environ = {
        "CARESYNC_DOWNSTREAM__BILLING__TIMEOUT_S": "2",
        "CARESYNC_DOWNSTREAM__BILLING__AUTH_HEADER": "Authorization: Bearer t0k",
        "caresync_downstream__supply__enabled": "false",
    }
    cfg = load_config(path, environ=environ)
    billing = cfg.downstream.billing
    assert (billing.transport, billing.url, billing.timeout_s) == (
        "http",
        "https://billing.example/api",
        2.0,
    )
    assert billing.auth_header == "Authorization: Bearer t0k"
    assert cfg.downstream.erp.max_attempts == 5
    assert cfg.downstream.erp.timeout_s == 5.0
    assert cfg.downstream.supply.enabled is False


def test_unknown_nested_key_in_file_is_named_with_hint(tmp_path: Path) -> None:
    path = write(tmp_path, "[downstream.erp]\ntimeout = 2.0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value) == (
        f"{path}: unknown key 'downstream.erp.timeout'; did you mean 'downstream.erp.timeout_s'?"
    )


def test_unknown_nested_table_in_file_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "[downstream.erpp]\ntimeout_s = 2.0\n")
    with pytest.raises(ConfigError, match=r"'downstream.erpp'; did you mean 'downstream.erp'"):
        load_config(path, environ={})


def test_nested_table_that_is_not_a_table_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "[downstream]\nerp = 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.key == "downstream.erp"
    assert "expected a table" in info.value.problem


@pytest.mark.parametrize(
    "var",
    [
        "CARESYNC_DOWNSTREAM__ERP__TIMEOUT",
        "CARESYNC_DOWNSTREAM__ERP",
        "CARESYNC_DOWNSTREAM__TIMEOUT_S",
        "CARESYNC_DOWNSTREAM__ERP__TIMEOUT_S__X",
    ],
)
def test_unknown_nested_variable_is_named(var: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={var: "2"})
    assert info.value.source == var
    assert "not a known setting" in info.value.problem


def test_unknown_nested_variable_gets_a_hint() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"CARESYNC_DOWNSTREAM__ERP__TIMEOUT": "2"})
    assert "did you mean CARESYNC_DOWNSTREAM__ERP__TIMEOUT_S?" in str(info.value)


def test_wrong_nested_value_names_the_key_and_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"CARESYNC_DOWNSTREAM__ERP__TRANSPORT": "smtp"})
    assert str(info.value) == (
        "CARESYNC_DOWNSTREAM__ERP__TRANSPORT: downstream.erp.transport: "
        "expected one of 'nats', 'http', got 'smtp'"
    )
    path = write(tmp_path, "[downstream.supply]\nmax_attempts = -1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value) == (f"{path}: downstream.supply.max_attempts: expected int >= 0, got -1")


@pytest.mark.parametrize("header", ["Bearer x", ": x", "Bad Name: x"])
def test_auth_header_needs_a_name(header: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"CARESYNC_DOWNSTREAM__ERP__AUTH_HEADER": header})
    assert info.value.key == "downstream.erp.auth_header"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[downstream.erp]\ntransport = 'http'\n", "downstream.erp.url"),
        ("[downstream.billing]\nbackoff_max_ms = 10.0\n", "downstream.billing.backoff_initial_ms"),
    ],
)
def test_downstream_cross_field_rules(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert (info.value.key, info.value.source) == (key, str(path))


def test_http_without_url_is_fine_when_disabled() -> None:
    environ = {
        "CARESYNC_DOWNSTREAM__ERP__TRANSPORT": "http",
        "CARESYNC_DOWNSTREAM__ERP__ENABLED": "false",
    }
    assert load_config(None, environ=environ).downstream.erp.transport == "http"


def test_dump_toml_round_trips_nested_tables(tmp_path: Path) -> None:
    environ = {
        "CARESYNC_DOWNSTREAM__BILLING__TRANSPORT": "http",
        "CARESYNC_DOWNSTREAM__BILLING__URL": "http://billing:8080/v1",
        "CARESYNC_DOWNSTREAM__BILLING__AUTH_HEADER": 'X-Api-Key: "k"',
        "CARESYNC_DOWNSTREAM__ERP__ENABLED": "false",
    }
    cfg = load_config(None, environ=environ)
    text = dump_toml(cfg)
    assert "[downstream.billing]" in text
    assert "# env: CARESYNC_DOWNSTREAM__BILLING__AUTH_HEADER" in text
    assert load_config(write(tmp_path, text), environ={}) == cfg
