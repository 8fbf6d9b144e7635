"""Settings from their sources (``service.server.config`` defines them): a YAML file, the
environment and the command line, validated, with every bad field on its own line of the
error; and the command line's parser (``python -m service --help``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.model.flags import add_model_flags, collect_flag_values
from service.server import config
from service.server.config import ENV_PREFIX, YAML_FILE, Settings


class ConfigError(ValueError):
    """Settings that cannot be used; the message has one line per problem."""


def load_settings(config_file: Path | None = None, **flags: Any) -> Settings:
    """Build validated settings; raises ConfigError with one line per bad field."""
    if config_file is not None and not Path(config_file).is_file():
        raise ConfigError(f"config file {config_file} does not exist")
    token = YAML_FILE.set(Path(config_file) if config_file else None)
    try:
        # None is a value here ("none" on the command line turns a port off); flags that
        # were not given never reach this call (collect_flag_values leaves them out).
        return Settings(**flags)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = ".".join(str(p) for p in error["loc"]) or "settings"
            got = f" (got {error['input']!r})" if "input" in error and error["loc"] else ""
            lines.append(f"  {field}: {error['msg']}{got}")
        raise ConfigError("invalid settings:\n" + "\n".join(lines)) from None
    finally:
        YAML_FILE.reset(token)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve image classification and localization models over gRPC.",
        epilog=config.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", type=Path, help=f"YAML file of settings (env: {ENV_PREFIX}CONFIG)"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the effective settings as JSON and exit"
    )
    add_model_flags(parser, Settings, env_prefix=ENV_PREFIX)
    return parser


def parse_flag_values(namespace: argparse.Namespace) -> dict[str, Any]:
    """Flag strings → values pydantic can validate (lists and dicts given as JSON or a,b,c)."""
    return collect_flag_values(namespace, Settings)
