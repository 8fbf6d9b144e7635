"""Settings models as flags: what a shell can type becomes what pydantic validates."""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import BaseModel, Field

from service.model.flags import add_model_flags, collect_flag_values


class Inner(BaseModel):
    scale: tuple[float, float] = (0.25, 1.0)


class Example(BaseModel):
    name: str = Field(default="demo", description="what to call it")
    workers: int = 2
    fast: bool = True
    models: list[str] = Field(default_factory=list)
    versions: dict[str, list[int]] = Field(default_factory=dict)
    weights: Path | None = None
    inner: Inner = Inner()


def parse(*argv: str) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser()
    add_model_flags(parser, Example, skip=["inner"], env_prefix="APP_")
    add_model_flags(parser, Inner, prefix="inner_")
    return parser, parser.parse_args(list(argv))


def test_only_the_flags_given_are_collected() -> None:
    _, args = parse()
    assert collect_flag_values(args, Example) == {}
    assert collect_flag_values(args, Inner, prefix="inner_") == {}


def test_shell_spellings_become_values_pydantic_validates() -> None:
    _, args = parse(
        "--workers", "4",
        "--no-fast",
        "--models", "a, b,",
        "--versions", '{"a": [1, 2]}',
        "--weights", "none",
        "--inner-scale", "0.3,1.0",
    )  # fmt: skip
    values = collect_flag_values(args, Example)
    assert values == {
        "workers": "4",
        "fast": False,
        "models": ["a", "b"],
        "versions": {"a": [1, 2]},
        "weights": None,
    }
    inner = collect_flag_values(args, Inner, prefix="inner_")
    assert inner == {"scale": ["0.3", "1.0"]}
    model = Example.model_validate({**values, "inner": inner})
    assert model.workers == 4 and model.inner.scale == (0.3, 1.0)


def test_lists_may_be_json_and_none_is_a_value_only_where_none_is_allowed() -> None:
    _, args = parse("--models", '["x"]', "--name", "none")
    assert collect_flag_values(args, Example) == {"models": ["x"], "name": "none"}


def test_help_names_the_description_default_and_environment_variable() -> None:
    parser, _ = parse()
    text = parser.format_help()
    assert "--no-fast" in text and "--inner-scale" in text and "--inner " not in text
    assert "what to call it (default: demo; env: APP_NAME)" in text
    assert "(default: [0.25, 1.0])" in text
