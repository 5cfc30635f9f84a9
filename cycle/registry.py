"""Named registries: the one list of architectures and of enhancement modes that the zoo, the
enhancement, the config and the evidence all read. The bottom layer: imports nothing of `cycle`.

    @register("mynet")                    # cycle.models.register = ARCHITECTURES.register
    @register_mode("mine", needs_donor=True)  # cycle.enhance.register_mode = ENHANCE_MODES.register

One decorator adds a name everywhere: the config accepts it, the evidence makes a mode a variant.
A registry's built-in entries are registered where they are defined, in the module named by
`builtins`, which the registry imports on its first look-up (not at import time): the config
validates names against a registry without importing torch until it validates one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


class Registry:
    """Names -> objects, in registration order, each with `info` flags (e.g. needs_donor)."""

    def __init__(self, kind: str, builtins: str | None = None):
        self.kind = kind  # what an entry is, for messages: "architecture"
        self.builtins = builtins  # module path of the built-in entries, imported on first look-up
        self._entries: dict[str, tuple[Any, dict[str, Any]]] = {}
        self._loaded = builtins is None

    def register(self, name: str, **info: Any) -> Callable[[Any], Any]:
        """Decorator: `@registry.register("name", flag=value)` adds the decorated object."""

        def wrap(obj: Any) -> Any:
            self._entries[name] = (obj, dict(info))
            return obj

        return wrap

    def unregister(self, name: str) -> None:
        """Remove an entry (a test's or a notebook's); an unknown name is a no-op."""
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        self._load()
        return list(self._entries)

    def __iter__(self):
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def check(self, name: str) -> str:
        """`name` if registered, else ValueError listing the registered names."""
        if name not in self:
            available = ", ".join(repr(n) for n in self._entries)
            raise ValueError(f"unknown {self.kind} {name!r}; available: {available}")
        return name

    def get(self, name: str) -> Any:
        return self._entries[self.check(name)][0]

    def info(self, name: str) -> dict[str, Any]:
        return dict(self._entries[self.check(name)][1])

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # before the import: the module registers into this registry
        try:
            importlib.import_module(self.builtins)
        except BaseException:
            self._loaded = False
            raise


ARCHITECTURES = Registry("architecture", builtins="cycle.models.zoo")
ENHANCE_MODES = Registry("enhance mode", builtins="cycle.enhance")
