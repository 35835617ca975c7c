"""Create any samkit optimizer from its name: the switch a training loop or a recipe uses."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from samkit.optim.core import SharpnessAware

_REGISTRY: dict[str, type[SharpnessAware]] = {}
T = TypeVar("T", bound=type[SharpnessAware])


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def register(*names: str) -> Callable[[T], T]:
    """Class decorator: make the optimizer available under `names` (case, '-' and '_' ignored)."""

    def add(cls: T) -> T:
        for name in names:
            _REGISTRY[_key(name)] = cls
        return cls

    return add


def get(name: str) -> type[SharpnessAware]:
    """The optimizer class registered as `name`."""
    try:
        return _REGISTRY[_key(name)]
    except KeyError:
        raise ValueError(
            f"unknown optimizer {name!r}; choose one of {', '.join(available())}"
        ) from None


def available() -> list[str]:
    """The registered names (one canonical name per method)."""
    seen: dict[type, str] = {}
    for key, cls in _REGISTRY.items():
        seen.setdefault(cls, key)
    return sorted(seen.values())


def create(name: str, params: Iterable[Any], **kwargs: Any) -> SharpnessAware:
    """Build the optimizer `name` over `params`; kwargs go to its constructor (and its base)."""
    return get(name)(params, **kwargs)
