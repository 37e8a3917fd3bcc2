"""The model registry: a model name in, a `torch.nn.Module` out.

Three sources, looked up in this order (a name taken by an earlier source hides later ones, with a warning):

1. built-ins, registered with `register_model` in `service.engine.models` (package `syncbn`);
2. entry points of the group `syncbn.models` of any installed package: the entry point's name is the model name and
   it loads a `factory(sample_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module` whose model uses
   ordinary `nn.BatchNorm*d` layers (the engine converts them when a job asks for synchronized BatchNorm);
3. torchvision's classification models as `torchvision/<name>`, where torchvision imports, built with
   `num_classes` and no weights (nothing is downloaded).

The registry is data: a job names a model, and only names listed here can be built. Nothing a request carries is
imported or executed; what runs is code the operator installed. The lists are read on every call (cheap: entry
points are metadata), so a package installed while the service runs shows up without a restart.

Example::

    register_model("tiny", "A one-layer net.")(lambda shape, classes: nn.Sequential(...))
    names = [entry.name for entry in list_models()]
    model = build_model("small_resnet", (1, 8, 8), num_classes=10)
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "ENTRY_POINT_GROUP",
    "TORCHVISION_PREFIX",
    "ModelEntry",
    "ModelFactory",
    "UnknownModelError",
    "build_model",
    "check_model_name",
    "get_model_entry",
    "list_models",
    "register_model",
]

logger = logging.getLogger(__name__)

#: Entry-point group that installed packages use to offer models.
ENTRY_POINT_GROUP = "syncbn.models"
#: Prefix of the names of torchvision's classification models.
TORCHVISION_PREFIX = "torchvision/"

ModelFactory = Callable[[tuple[int, ...], int], "nn.Module"]

_BUILTINS: dict[str, ModelEntry] = {}


@dataclass(frozen=True)
class ModelEntry:
    """One buildable model: its name, the package that provides it, one line about it, and how to load it."""

    name: str
    package: str
    summary: str
    source: str  # "builtin", "entry_point" or "torchvision"
    load: Callable[[], ModelFactory] = field(repr=False, compare=False)


class UnknownModelError(ValueError):
    """A job names a model that the registry does not list; the message offers close matches."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        self.name = name
        self.matches = _close_matches(name, known)
        hint = f"did you mean {' or '.join(repr(m) for m in self.matches)}? " if self.matches else ""
        super().__init__(
            f"model {name!r} is not a model this service can build: {hint}"
            "GET /v1/models lists the models it can build (built-ins, installed plugins and torchvision's)."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_unknown, (self.name, self.matches))


def _rebuild_unknown(name: str, matches: list[str]) -> UnknownModelError:
    return UnknownModelError(name, matches)


def _close_matches(name: str, known: Sequence[str]) -> list[str]:
    lowered = {k.lower(): k for k in known}
    found = difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.6)
    # A bare torchvision name ("resnet50") is a close match for its prefixed form.
    bare = lowered.get(f"{TORCHVISION_PREFIX}{name.lower()}")
    matches = [lowered[f] for f in found]
    if bare is not None and bare not in matches:
        matches.insert(0, bare)
    return matches[:3]


def _first_line(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""


def register_model(name: str, summary: str | None = None) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering a built-in factory under `name` (summary: the factory's first docstring line)."""

    def decorate(factory: ModelFactory) -> ModelFactory:
        if name in _BUILTINS:
            raise ValueError(f"a built-in model named {name!r} is already registered")
        _BUILTINS[name] = ModelEntry(
            name=name,
            package="syncbn",
            summary=summary or _first_line(factory),
            source="builtin",
            load=lambda: factory,
        )
        return factory

    return decorate


def _builtin_entries() -> list[ModelEntry]:
    importlib.import_module("service.engine.models")  # registers the built-ins on first use
    return list(_BUILTINS.values())


def _entry_point_entries(taken: set[str]) -> list[ModelEntry]:
    found: list[ModelEntry] = []
    for point in entry_points(group=ENTRY_POINT_GROUP):
        package = point.dist.name if point.dist is not None else point.module.split(".")[0]
        if point.name in taken or point.name.startswith(TORCHVISION_PREFIX):
            logger.warning(
                "ignoring entry point %r of package %s: the name is taken by another model", point.name, package
            )
            continue
        try:
            factory = point.load()
        except Exception as exc:  # a broken plugin must not hide the others
            logger.warning("ignoring entry point %r of package %s: it failed to load: %r", point.name, package, exc)
            continue
        if not callable(factory):
            logger.warning("ignoring entry point %r of package %s: it is not callable", point.name, package)
            continue
        taken.add(point.name)
        found.append(
            ModelEntry(
                name=point.name,
                package=package,
                summary=_first_line(factory),
                source="entry_point",
                load=_loader(point),
            )
        )
    return found


def _loader(point: EntryPoint) -> Callable[[], ModelFactory]:
    return lambda: point.load()


def _torchvision_entries() -> list[ModelEntry]:
    try:
        tv_models = importlib.import_module("torchvision.models")
    except Exception as exc:  # missing, or built against another torch: no torchvision models here
        logger.debug("torchvision models unavailable: %r", exc)
        return []
    entries = []
    for name in tv_models.list_models(module=tv_models):
        builder = tv_models.get_model_builder(name)
        entries.append(
            ModelEntry(
                name=f"{TORCHVISION_PREFIX}{name}",
                package="torchvision",
                summary=_first_line(builder) or f"torchvision's {name}",
                source="torchvision",
                load=_torchvision_loader(name),
            )
        )
    return entries


def _torchvision_loader(name: str) -> Callable[[], ModelFactory]:
    def factory(sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        tv_models = importlib.import_module("torchvision.models")
        if len(sample_shape) != 3 or sample_shape[0] != 3:
            raise ValueError(
                f"model {TORCHVISION_PREFIX}{name} takes 3-channel images (3, height, width), got sample shape "
                f"{tuple(sample_shape)}: use a data set of RGB images or a built-in model."
            )
        return tv_models.get_model(name, weights=None, num_classes=num_classes)

    return lambda: factory


def list_models() -> list[ModelEntry]:
    """Every model this process can build: built-ins, then installed entry points, then torchvision's."""
    entries = _builtin_entries()
    taken = {entry.name for entry in entries}
    entries += _entry_point_entries(taken)
    entries += _torchvision_entries()
    return entries


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry named `name`.

    Raises:
        UnknownModelError: no such model here (the message lists close matches).
    """
    entries = list_models()
    for entry in entries:
        if entry.name == name:
            return entry
    raise UnknownModelError(name, [entry.name for entry in entries])


def check_model_name(name: str) -> None:
    """Raise `UnknownModelError` unless the registry can build `name` (what the service checks at submit time)."""
    get_model_entry(name)


def build_model(name: str, sample_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build model `name` for samples of `sample_shape` and `num_classes` outputs, from torch's current RNG.

    Args:
        name: a name from `list_models()`.
        sample_shape: shape of one input sample, e.g. `(channels, height, width)`.
        num_classes: number of output logits.

    Raises:
        UnknownModelError: the name is not in the registry.
        ValueError: the factory refuses these samples (e.g. a conv model given vectors).
        TypeError: the factory did not return a `torch.nn.Module`.
    """
    from torch import nn

    entry = get_model_entry(name)
    shape = tuple(int(d) for d in sample_shape)
    model = entry.load()(shape, int(num_classes))
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model {name!r} (package {entry.package}) must build a torch.nn.Module, got {type(model).__name__}: "
            "fix its factory."
        )
    return model
