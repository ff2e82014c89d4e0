"""`option`: a config dataclass field with its command-line help, the one source of every command's
options (the CLI is generated from the config dataclasses); and the `--device` and `--dtype` values."""
from __future__ import annotations

from dataclasses import MISSING, field


def option(default=MISSING, help: str = "", **meta):
    """A config field with its command-line help (and e.g. `choices`, `group`, `cli=False`);
    without a default it is required."""
    if default is MISSING:
        return field(metadata={"help": help, **meta})
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


class _Devices(tuple):
    """The `--device` values: these names, and `cuda:N` for any N (argparse asks `in`)."""

    def __contains__(self, value) -> bool:
        import re

        return tuple.__contains__(self, value) or bool(re.fullmatch(r"cuda:\d+", str(value)))


DEVICES = _Devices(("auto", "cpu", "cuda", "cuda:N", "mps"))
PRECISIONS = ("fp32", "bf16", "fp16")
