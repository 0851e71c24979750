"""Shared plumbing for the pydantic-validated values (node configuration, clinical records).

Pydantic raises its own ``ValidationError``; the project's callers expect the error type of
the domain (``ConfigError``, ``ClinicalRecordError``) with messages that name each key.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import ValidationError

_C = TypeVar("_C")


def raising_on_invalid(
    make_error: Callable[[ValidationError, type[Any]], Exception],
) -> Callable[[type[_C]], type[_C]]:
    """Class decorator: direct construction (and ``dataclasses.replace``) raises ``make_error(exc, cls)``
    instead of pydantic's ``ValidationError``, so building a value in code fails as loading it does."""

    def decorate(cls: type[_C]) -> type[_C]:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except ValidationError as exc:
                raise make_error(exc, cls) from None

        cls.__init__ = __init__  # type: ignore[method-assign]
        return cls

    return decorate
