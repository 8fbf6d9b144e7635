"""A pydantic model's fields as command-line flags, and the flags' strings back as values.

Both CLIs are built from their settings models this way, so every setting is a flag with
its description and default in ``--help``: ``python -m service`` from ``Settings``, and
``python -m training train`` from ``TrainConfig`` (and ``AugmentConfig`` under a prefix).
Flags default to ``None`` (= not given), so a flag overrides a YAML file or the
environment only when it is on the command line. Pydantic does the validation; this
module only splits what a shell can say (``a,b,c``, JSON, ``none``) into Python values.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

NONE_WORDS = ("none", "null")


def flag(name: str, prefix: str = "") -> str:
    return "--" + (prefix + name).replace("_", "-")


def _shown(field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)
    if default is None:
        return "none"
    return default if isinstance(default, str) else json.dumps(default, default=str)


def add_model_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    *,
    prefix: str = "",
    skip: Iterable[str] = (),
    env_prefix: str | None = None,
) -> None:
    """One flag per field of ``model``: ``--name`` (``--prefix-name``); booleans get
    ``--name/--no-name``. ``env_prefix`` adds the environment variable to each help."""
    skipped = set(skip)
    for name, field in model.model_fields.items():
        if name in skipped:
            continue
        env = f"; env: {env_prefix}{name.upper()}" if env_prefix else ""
        text = (
            f"{field.description + ' ' if field.description else ''}(default: {_shown(field)}{env})"
        )
        dest = prefix + name
        if field.annotation is bool:
            parser.add_argument(
                flag(name, prefix),
                dest=dest,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=text,
            )
        else:
            parser.add_argument(
                flag(name, prefix), dest=dest, default=None, metavar="VALUE", help=text
            )


def _value(text: str, field: FieldInfo) -> Any:
    annotation = str(field.annotation)
    if text.lower() in NONE_WORDS and "None" in annotation:
        return None
    if annotation.startswith(("list", "dict", "tuple")):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return [v.strip() for v in text.split(",") if v.strip()]
    return text


def collect_flag_values(
    namespace: argparse.Namespace, model: type[BaseModel], *, prefix: str = ""
) -> dict[str, Any]:
    """The fields given on the command line, as values pydantic can validate: lists,
    tuples and dicts as JSON or ``a,b,c``; ``none`` for optional fields."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        value = getattr(namespace, prefix + name, None)
        if value is None:
            continue
        out[name] = value if isinstance(value, bool) else _value(value, field)
    return out
