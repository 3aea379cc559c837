"""caresync configuration: one TOML file plus ``CARESYNC_<SECTION>__<KEY>`` overrides.

>>> cfg = load_config(Path("caresync.toml"))  # doctest: +SKIP
>>> cfg.router.batch_size  # doctest: +SKIP
500
"""

from __future__ import annotations

from .errors import ConfigError
from .loading import (
    ENV_PREFIX,
    RESERVED_ENV_VARS,
    config_as_dict,
    dump_defaults_toml,
    dump_toml,
    load_config,
)
from .schema import (
    Config,
    IngestConfig,
    LogConfig,
    NatsConfig,
    OutboxConfig,
    RouterConfig,
    SnapshotsConfig,
    StoreConfig,
    StreamsConfig,
    SupervisionConfig,
)

__all__ = [
    "ENV_PREFIX",
    "RESERVED_ENV_VARS",
    "Config",
    "ConfigError",
    "IngestConfig",
    "LogConfig",
    "NatsConfig",
    "OutboxConfig",
    "RouterConfig",
    "SnapshotsConfig",
    "StoreConfig",
    "StreamsConfig",
    "SupervisionConfig",
    "config_as_dict",
    "dump_defaults_toml",
    "dump_toml",
    "load_config",
]
