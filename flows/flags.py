"""The command-line flags of the requests, derived from their fields: a flag's help is its field's
description, the text the dashboard's run form shows too (Prefect reads the fields' schema), and its
line in docs/cli.md (generated from these, `python -m grove.shell.cli_docs`). The shell builds its
argparse parsers from :class:`Flag` (grove/shell/cli.py)."""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

__all__ = ["Flag", "auto_opt_flags", "benchmark_flags", "finetune_flags", "flags_of"]


@dataclass(frozen=True)
class Flag:
    name: str  # the field's name; the flag is --<name>
    help: str
    short: str | None = None  # e.g. -m
    default: str | None = None  # the default in words; None: none, or said in the help
    choices: tuple[Any, ...] | None = None
    type: type | None = None  # int or float; None: a string (or a switch)
    many: bool = False  # takes one or more values
    switch: Literal["on", "on_off"] | None = None  # --name (store_true), or --name / --no-name
    required: bool = False
    group: str | None = None  # the --help section it is listed under; None: the command's own

    @property
    def flags(self) -> list[str]:
        return [*([self.short] if self.short else []), f"--{self.name}"]


def _literal(kind: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(kind) is Literal:
        return typing.get_args(kind)
    inner = [a for a in typing.get_args(kind) if a is not type(None)]
    return _literal(inner[0]) if len(inner) == 1 else None


def _scalar(kind: Any) -> Any:
    """``X | None`` as X; any other annotation as it is."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return kind


def _shown_default(field: FieldInfo) -> str | None:
    if field.is_required() or field.default_factory is not None:
        return None
    default = field.get_default()
    if default in (None, False, "", ()):
        return None
    return "on" if default is True else str(default)


def _flag(name: str, field: FieldInfo, short: str | None, group: str | None) -> Flag:
    kind = _scalar(field.annotation)
    choices = _literal(kind)
    if kind is bool or choices == (True,):
        switch: Literal["on", "on_off"] = "on_off" if field.get_default() is True and choices is None else "on"
        return Flag(name, field.description or "", short, _shown_default(field) if switch == "on_off" else None,
                    switch=switch, group=group)
    many = typing.get_origin(kind) is list
    element = typing.get_args(kind)[0] if many else kind
    numeric = element if element in (int, float) else None
    if choices is not None and all(isinstance(c, int) for c in choices):
        numeric = int
    return Flag(name, field.description or "", short, _shown_default(field), choices=choices, type=numeric,
                many=many, required=field.is_required(), group=group)


def flags_of(model: type[BaseModel], *, exclude: Iterable[str] = (), short: Mapping[str, str] | None = None,
             group: str | None = None) -> list[Flag]:
    """A flag per field of ``model`` (in field order), but those in ``exclude``."""
    skip, short = set(exclude), short or {}
    return [_flag(name, field, short.get(name), group) for name, field in model.model_fields.items()
            if name not in skip]


# Request fields that are not flags: set by a fleet refresh (publish_as), a deployment's run form
# (gpu_nodes) or the bench (threads).
_NOT_FLAGS = ("publish_as", "gpu_nodes", "threads")
_SHORT = {"model_name_or_path": "-m", "output_path": "-o"}


def auto_opt_flags() -> list[Flag]:
    """``grove auto-opt``'s flags: a decoder's request's fields, then the encoder-only ones under their own
    heading. A flag both paths take with a meaning of their own says both (decoders first)."""
    from grove.flows.request import AutoOptRequest
    from grove.flows.request_encoder import EncoderOptRequest
    from grove.tasks.architectures import ARCHITECTURES

    encoders = f"encoders ({', '.join(m for m, s in ARCHITECTURES.items() if s.path == 'encoder')})"
    decoder = {f.name: f for f in flags_of(AutoOptRequest, exclude=_NOT_FLAGS, short=_SHORT)}
    encoder = {f.name: f for f in flags_of(EncoderOptRequest, exclude=_NOT_FLAGS, short=_SHORT, group=encoders)}
    merged = []
    for name, flag in decoder.items():
        other = encoder.get(name)
        if other is None:
            merged.append(flag)
            continue
        choices = (tuple(dict.fromkeys((*flag.choices, *other.choices))) if flag.choices and other.choices
                   else None)
        default = (flag.default if flag.default == other.default else
                   "; ".join(f"{d} ({path})" for d, path in ((flag.default, "decoders"), (other.default, "encoders"))
                             if d is not None) or None)
        text = flag.help if flag.help == other.help else f"decoders: {flag.help}. Encoders: {other.help}"
        merged.append(Flag(name, text, flag.short, default, choices=choices, type=flag.type or other.type,
                           many=flag.many or other.many, switch=flag.switch,
                           required=flag.required or name == "output_path"))  # the CLI writes its output somewhere
    merged += [f for name, f in encoder.items() if name not in decoder]
    return merged


_FINETUNE_SHORT = {"model_name_or_path": "-m", "output_path": "-o", "data_name": "-d"}


def finetune_flags() -> list[Flag]:
    """``grove finetune``'s flags: its request's fields (TrainingArguments are the other --flags)."""
    from grove.flows.request_finetune import FinetuneRequest

    return flags_of(FinetuneRequest, exclude=("training_args",), short=_FINETUNE_SHORT)


def benchmark_flags() -> list[Flag]:
    """``grove benchmark``'s flags: its request's fields, with Olive's names."""
    from grove.flows.request_benchmark import BenchmarkRequest

    return flags_of(BenchmarkRequest, short={"model_name_or_path": "-m", "output_path": "-o"})
