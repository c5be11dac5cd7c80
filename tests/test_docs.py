"""The README's configuration reference names every config key (docs do not drift from code)."""

import dataclasses
import typing
from pathlib import Path

from peaknet_daemon.config import Config

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def leaf_keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from leaf_keys(tp, key + ".")
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            yield from leaf_keys(typing.get_args(tp)[0], key + "[].")
        else:
            yield key


def test_every_config_key_is_documented():
    missing = [k for k in leaf_keys(Config) if f"`{k}`" not in README]
    assert not missing, f"README's configuration reference lacks {missing}"
