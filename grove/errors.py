"""The few named errors Grove raises. Each message says what was asked, why it cannot work,
and what to do instead; the CLI prints it as one line and exits non-zero."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from pydantic import ValidationError

__all__ = [
    "GroveError",
    "InvalidRequest",
    "ModelSourceError",
    "MissingExtra",
    "ParityError",
    "StoreError",
    "UnsupportedArchitecture",
    "one_line",
]


def one_line(exc: ValidationError, where: Callable[[tuple[int | str, ...]], str]) -> str:
    """pydantic's validation errors as one line, each as where(location) + message (without
    pydantic's 'Value error, ' prefix), joined by '; '."""
    return "; ".join(where(tuple(e["loc"])) + str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())


class GroveError(Exception):
    """Base class: an error the user can act on (never a bug)."""

    exit_code = 2


class InvalidRequest(GroveError):
    """Flags or config that contradict each other or name something that does not exist."""


class ModelSourceError(GroveError):
    """The model cannot be found, read or trusted."""


class StoreError(GroveError):
    """The artifact store is unreachable, or an artifact in it is missing or corrupt."""


class MissingExtra(GroveError):
    def __init__(self, package: str, install_hint: str) -> None:
        super().__init__(f"this step needs the Python package '{package}', which is not installed; {install_hint}")
        self.package = package


class UnsupportedArchitecture(GroveError):
    def __init__(self, model_type: str, supported: list[str], path: str = "",
                 fix: str = "Pick a model of one of these architectures, or open an issue with the model id.") -> None:
        where = f" for the {path} path" if path else ""
        super().__init__(f"model_type '{model_type}' is not supported{where}; supported: {', '.join(supported)}. {fix}")
        self.model_type = model_type
        self.supported = supported


class ParityError(GroveError):
    """A transformation changed the model's outputs beyond the tolerance for its precision."""

    def __init__(self, what: str, measured: float, limit: float, detail: str = "", flag: str | None = None,
                 fix: str = "try a higher precision or another algorithm") -> None:
        # flag: the option that sets this limit, if the user can (the others are fixed per precision);
        # fix: what to change, in the words of the flags of the step that failed.
        relax = f", or pass a lower {flag} if this is expected" if flag else ""
        super().__init__(
            f"parity check failed: {what} = {measured:.4g}, limit {limit:.4g}{'; ' + detail if detail else ''}. "
            f"The transformed model does not match its reference; {fix}{relax}."
        )
        self.what = what
        self.measured = measured
        self.limit = limit
