"""The federated methods, each one unit (sub-model family, client trainer, server rule, cost model).

Adding a method: write its class (subclass :class:`FederatedMethod` or a
sibling) in a module of this package and add one line to the registry,
:data:`maestro_fl.catalog.METHOD_CLASSES` (docs/adding_a_method.md). Its options
are its ``Params``, its variants for ``maestro-fl compare`` its ``variants``;
the config, ``compare`` and the tests' method table all follow the registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from functools import cache

from .. import catalog
from .base import Assignment, ClientTask, FederatedMethod, LocalResult, LocalTraining, NoParams, Update


@cache
def _load(reference: str) -> type[FederatedMethod]:
    module, _, attr = reference.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, FederatedMethod)):
        raise TypeError(f"the registry names {reference!r}, which is not a FederatedMethod subclass")
    return cls


class MethodRegistry(Mapping[str, type[FederatedMethod]]):
    """Every method by its ``strategy`` name: the classes :data:`maestro_fl.catalog.METHOD_CLASSES` names, in its
    order, each imported when first looked up."""

    def __getitem__(self, name: str) -> type[FederatedMethod]:
        return _load(catalog.METHOD_CLASSES[name])

    def __iter__(self) -> Iterator[str]:
        return iter(list(catalog.METHOD_CLASSES))

    def __len__(self) -> int:
        return len(catalog.METHOD_CLASSES)


#: every method by its ``strategy`` name, in the order `maestro-fl compare` lists them
METHODS: Mapping[str, type[FederatedMethod]] = MethodRegistry()

__all__ = ["METHODS", "Assignment", "ClientTask", "FederatedMethod", "LocalResult", "LocalTraining", "NoParams", "Update"]
