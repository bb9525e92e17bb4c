"""Models, datasets and device populations named by reference, as Flower names app components.

A config names a component three ways:

* a built-in name (``model = "cnn"``);
* an import reference ``"package.module:attr"`` (``model = "mypkg.nets:build"``), resolved by
  importing the module, in the driver and in every Ray worker: the module must be
  importable there (on a cluster, installed on every node or shipped with Ray's
  ``runtime_env``); the reference is written to the run's ``config.json``, so the
  run can be rebuilt and resumed;
* an object handed to the Python API (``strategies.api``): it is registered in
  this process under ``"object:KIND:NAME-N"`` and shipped to Ray workers and
  sweep tasks with the run. Such a run is rebuilt by passing the same object again.

Every failure is a :class:`~maestro_fl.config.ConfigError`-style ``ValueError``
naming the field and what is allowed.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

OBJECT_PREFIX = "object:"
_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_OBJECTS: dict[str, Any] = {}


class UnresolvedReference(ValueError):
    """A reference does not import, or names nothing (raised as a ConfigError by the config)."""


def is_reference(text: str) -> bool:
    """``"package.module:attr"`` or a registered object's name."""
    return text.startswith(OBJECT_PREFIX) or bool(_REFERENCE.match(text)) and not text.startswith("hf:")


def register(obj: Any, kind: str) -> str:
    """Register an in-memory object for this process's runs; returns the name configs refer to it by."""
    for name, known in _OBJECTS.items():
        if known is obj:
            return name
    label = re.sub(r"\W", "_", getattr(obj, "__name__", type(obj).__name__))[:40]
    name = f"{OBJECT_PREFIX}{kind}:{label}-{len(_OBJECTS) + 1}"
    _OBJECTS[name] = obj
    return name


def registered() -> dict[str, Any]:
    """The registered objects (shipped to Ray workers and sweep tasks)."""
    return dict(_OBJECTS)


def referenced(*values: str) -> dict[str, Any]:
    """The registered objects that ``values`` (config fields) name: what a run must ship to its workers."""
    return {v: _OBJECTS[v] for v in values if v in _OBJECTS}


def install(objects: dict[str, Any]) -> None:
    """Register objects shipped from the driver (in a Ray worker or task)."""
    _OBJECTS.update(objects)


def resolve(reference: str, field: str) -> Any:
    """The object a reference names.

    Raises
    ------
    UnresolvedReference
        Naming ``field``: the module does not import, the attribute does not
        exist, or a registered object is not known in this process.
    """
    if reference.startswith(OBJECT_PREFIX):
        if reference not in _OBJECTS:
            raise UnresolvedReference(
                f"{field}: {reference!r} names an object of another Python process; a run made from in-memory "
                "objects is rebuilt by passing the same objects to the Python API again")
        return _OBJECTS[reference]
    module_name, _, attr = reference.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - an import can fail any way; all mean the same to the user
        raise UnresolvedReference(
            f"{field}: cannot import module {module_name!r} of reference {reference!r} "
            f"({type(err).__name__}: {err}); it must be importable here (and on every node of a Ray cluster)"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UnresolvedReference(f"{field}: module {module_name!r} has no attribute {attr!r} (reference {reference!r})")
        obj = getattr(obj, part)
    return obj
