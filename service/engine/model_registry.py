"""The model registry: a model name in, a `torch.nn.Module` out.

Four sources, looked up in this order (a name taken by an earlier source hides later ones, with a warning):

1. built-ins, registered with `register_model` in `service.engine.models` (package `syncbn`);
2. entry points of the group `syncbn.models` of any installed package: the entry point's name is the model name and
   it loads a `factory(sample_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module` whose model uses
   ordinary `nn.BatchNorm*d` layers (the engine converts them when a job asks for synchronized BatchNorm);
3. torchvision's classification models as `torchvision/<name>`, where torchvision imports, built with
   `num_classes` and no weights (nothing is downloaded). They take 3-channel images, exactly as torchvision
   defines them (so the saved state dict loads into `torchvision.models.<name>(num_classes=...)`): a 1-channel
   data set is refused at submit time rather than given a changed stem;
4. timm's models as `timm/<name>`, where timm imports, built with `pretrained=False`, `num_classes` and
   `in_chans` from the data set (timm's own way of taking any channel count).

Each entry says which input channels it takes (`input_channels`: 3 for torchvision's, None for the others, which
build for the data set's channels), so a mismatch is a 422 at submit time (`check_model_name` with a sample
shape), not a failure of every worker a minute later. Summaries are the first whole sentence of the factory's
docstring (reStructuredText links and roles reduced to their text).

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
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "ENTRY_POINT_GROUP",
    "TIMM_PREFIX",
    "TORCHVISION_PREFIX",
    "ModelEntry",
    "ModelFactory",
    "ModelInputError",
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
#: Prefix of the names of timm's models.
TIMM_PREFIX = "timm/"
#: Input channels of every torchvision classification model.
TORCHVISION_CHANNELS = 3

ModelFactory = Callable[[tuple[int, ...], int], "nn.Module"]

_BUILTINS: dict[str, ModelEntry] = {}


@dataclass(frozen=True)
class ModelEntry:
    """One buildable model: its name, the package that provides it, a sentence about it, and how to load it."""

    name: str
    package: str
    summary: str
    source: str  # "builtin", "entry_point", "torchvision" or "timm"
    load: Callable[[], ModelFactory] = field(repr=False, compare=False)
    #: The input channels the model takes whatever the data; None: built for the data set's channels.
    input_channels: int | None = None


class UnknownModelError(ValueError):
    """A job names a model that the registry does not list; the message offers close matches."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        self.name = name
        self.matches = _close_matches(name, known)
        hint = f"did you mean {' or '.join(repr(m) for m in self.matches)}? " if self.matches else ""
        super().__init__(
            f"model {name!r} is not a model this service can build: {hint}"
            "GET /v1/models lists the models it can build (built-ins, installed plugins, torchvision's and timm's)."
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


class ModelInputError(ValueError):
    """A job's data does not fit the model's input (e.g. 1-channel images for a 3-channel torchvision model)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (ModelInputError, (str(self),))


# `text <https://...>`__ (a reStructuredText link) -> text; :class:`~torch.nn.Module` / :func:`f` -> Module / f;
# ``literal`` and `interpreted text` -> their text.
_RST_LINK = re.compile(r"`([^`]*?)\s*<[a-z]+://[^>`]*>`_{1,2}")
_RST_ROLE = re.compile(r":[a-z]+:`~?(?:[\w.]*\.)?([^`]+)`")
_RST_QUOTED = re.compile(r"``?([^`]+)``?")
# A sentence ends at . ! or ? followed by white space and a capital, a digit or an opening bracket/quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\"'])")


def first_sentence(doc: str) -> str:
    """The first whole sentence of a docstring's first paragraph, on one line, ending with `.`, `!` or `?`.

    Docstrings wrap their first sentence over several lines (torchvision's do), and name papers with
    reStructuredText links; the listing wants the sentence whole and readable: "ResNet-18 from Deep Residual
    Learning for Image Recognition." A first paragraph without a full stop (timm's "EfficientNet-B0") gets one.
    """
    paragraph = re.split(r"\n\s*\n", inspect.cleandoc(doc).strip(), maxsplit=1)[0]
    text = " ".join(paragraph.split())
    text = _RST_QUOTED.sub(r"\1", _RST_ROLE.sub(r"\1", _RST_LINK.sub(r"\1", text)))
    text = _SENTENCE_END.split(text, maxsplit=1)[0].strip()
    if text and text[-1] not in ".!?":
        text = text.rstrip(":;,") + "."
    return text


def _summary(obj: object, fallback: str) -> str:
    """`first_sentence` of `obj`'s docstring, or `fallback` when it has none."""
    return first_sentence(inspect.getdoc(obj) or "") or fallback


def register_model(name: str, summary: str | None = None) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering a built-in factory under `name` (summary: the factory's first docstring line)."""

    def decorate(factory: ModelFactory) -> ModelFactory:
        if name in _BUILTINS:
            raise ValueError(f"a built-in model named {name!r} is already registered")
        _BUILTINS[name] = ModelEntry(
            name=name,
            package="syncbn",
            summary=summary or _summary(factory, f"The built-in model {name}."),
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
        if point.name in taken or point.name.startswith((TORCHVISION_PREFIX, TIMM_PREFIX)):
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
                summary=_summary(factory, f"The model {point.name} of the package {package}."),
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
                summary=_summary(builder, f"torchvision's {name}."),
                source="torchvision",
                load=_torchvision_loader(name),
                input_channels=TORCHVISION_CHANNELS,
            )
        )
    return entries


def _torchvision_loader(name: str) -> Callable[[], ModelFactory]:
    def factory(sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        tv_models = importlib.import_module("torchvision.models")
        _check_channels(f"{TORCHVISION_PREFIX}{name}", TORCHVISION_CHANNELS, sample_shape, None)
        return tv_models.get_model(name, weights=None, num_classes=num_classes)

    return lambda: factory


def _timm_entries() -> list[ModelEntry]:
    try:
        timm = importlib.import_module("timm")
    except Exception as exc:  # missing, or without a torchvision that matches torch (timm imports torchvision.ops)
        logger.debug("timm models unavailable: %r", exc)
        return []
    entries = []
    for name in timm.list_models():
        entrypoint = timm.models.model_entrypoint(name)
        entries.append(
            ModelEntry(
                name=f"{TIMM_PREFIX}{name}",
                package="timm",
                summary=_summary(entrypoint, f"timm's {name}."),
                source="timm",
                load=_timm_loader(name),
            )
        )
    return entries


def _timm_loader(name: str) -> Callable[[], ModelFactory]:
    def factory(sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        timm = importlib.import_module("timm")
        if len(sample_shape) != 3:
            raise ModelInputError(
                f"model {TIMM_PREFIX}{name} takes images (channels, height, width), got sample shape "
                f"{tuple(sample_shape)}: use image data, or model 'mlp' for vectors."
            )
        # pretrained=False: nothing is downloaded; in_chans: timm builds the stem for the data set's channels.
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=sample_shape[0])

    return lambda: factory


def _check_channels(name: str, channels: int, sample_shape: Sequence[int], dataset_kind: str | None) -> None:
    """Raise `ModelInputError` unless `sample_shape` is an image with `channels` channels."""
    shape = tuple(int(d) for d in sample_shape)
    if len(shape) == 3 and shape[0] == channels:
        return
    got = f"{shape[0]}-channel images {shape}" if len(shape) == 3 else f"samples of shape {shape} (not images)"
    of_data = f"the data set (dataset.kind {dataset_kind!r})" if dataset_kind else "the data set"
    if dataset_kind in ("image_folder", "parquet") and len(shape) == 3:
        fix = f"set dataset.channels to {channels} (images are converted on reading)"
    else:
        fix = f"use {channels}-channel images (an image_folder or parquet data set with dataset.channels {channels})"
    raise ModelInputError(
        f"model {name!r} takes {channels}-channel images ({channels}, height, width), but {of_data} has {got}: "
        f"{fix}, or use a model built for the data's channels (the built-ins, or timm/<name> where timm is "
        "installed)."
    )


def list_models() -> list[ModelEntry]:
    """Every model this process can build: built-ins, then installed entry points, then torchvision's, then timm's."""
    entries = _builtin_entries()
    taken = {entry.name for entry in entries}
    entries += _entry_point_entries(taken)
    entries += _torchvision_entries()
    entries += _timm_entries()
    return entries


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry named `name`.

    Raises:
        UnknownModelError: no such model here (the message lists close matches).
    """
    # A prefixed name is looked up in its own source only: a worker building a built-in never imports timm.
    if name.startswith(TORCHVISION_PREFIX):
        candidates = _torchvision_entries()
    elif name.startswith(TIMM_PREFIX):
        candidates = _timm_entries()
    else:
        candidates = _builtin_entries()
        candidates += _entry_point_entries({entry.name for entry in candidates})
    for entry in candidates:
        if entry.name == name:
            return entry
    raise UnknownModelError(name, [entry.name for entry in list_models()])


def check_model_name(name: str, sample_shape: Sequence[int] | None = None, dataset_kind: str | None = None) -> None:
    """What the service checks at submit time: the registry can build `name`, for samples of `sample_shape`.

    Args:
        name: the job's `model`.
        sample_shape: one sample's shape when it is known before loading (`DatasetSpec.sample_shape()`), or None.
        dataset_kind: the data set's kind, to name it and the fix in the message.

    Raises:
        UnknownModelError: no such model here (the message lists close matches).
        ModelInputError: the model takes a fixed number of input channels and the data has another
            (the message names both and the fix).
    """
    entry = get_model_entry(name)
    if sample_shape is not None and entry.input_channels is not None:
        _check_channels(name, entry.input_channels, sample_shape, dataset_kind)


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
