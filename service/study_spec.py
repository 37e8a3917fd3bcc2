"""The study spec: one job spec run in a few variants (arms) with the same seeds, to compare them pair by pair.

A study answers "does synchronised BatchNorm pay on my data?": by default it runs `base` with `sync_bn: true` and
with `sync_bn: false`, each with seeds 0, 1, 2; every (arm, seed) is an ordinary job (a trial), and the verdict
(`service.store.verdict`) compares the arms' best validation metric seed by seed.

An arm overrides only what a comparison of BatchNorm choices needs (`ARM_FIELDS`); each arm merged with the base
must be a valid `JobSpec` (a 422 naming `arms[i].field` otherwise), so a study never creates a trial that would be
refused as a job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from service.spec import JobSpec, Precision, read_spec_mapping

__all__ = ["ARM_FIELDS", "MAX_ARMS", "MAX_SEEDS", "ArmSpec", "StudySpec", "arm_label", "load_study_file"]

#: Most arms of one study, and most seeds per arm (so at most 80 trials).
MAX_ARMS = 8
MAX_SEEDS = 10
#: The JobSpec fields an arm may override.
ARM_FIELDS = ("sync_bn", "sync_group_size", "batch_size", "workers", "precision")

StudyMetric = Literal["val_accuracy", "val_loss"]


class ArmSpec(BaseModel):
    """One arm: the fields it changes in the base spec (fields left out keep the base's value)."""

    model_config = ConfigDict(extra="forbid")

    sync_bn: bool | None = Field(None, description="SyncBatchNorm (true) or local BatchNorm per rank (false).")
    sync_group_size: int | None = Field(
        None, ge=2, le=512, description="Synchronise within groups of this many ranks (null: all ranks)."
    )
    batch_size: int | None = Field(None, ge=1, le=65_536, description="Samples per worker per step.")
    workers: int | None = Field(None, ge=1, le=512, description="Data-parallel ranks.")
    precision: Precision | None = Field(None, description="fp32, bf16 or fp16 (GPU only).")

    @model_serializer(mode="wrap")
    def _only_given(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """An arm serialises to the fields it sets only: a field left out keeps the base's value, which a null
        would not (an explicit null sync_group_size is kept: it means all ranks)."""
        return {key: value for key, value in handler(self).items() if key in self.model_fields_set}

    def overrides(self) -> dict[str, Any]:
        """The fields this arm sets, as given."""
        return self.model_dump(mode="json")


def arm_label(overrides: dict[str, Any]) -> str:
    """A short name for an arm, e.g. `sync_bn=true` or `sync_bn=false, batch_size=8` (`base` when empty)."""
    if not overrides:
        return "base"
    parts = []
    for key in ARM_FIELDS:
        if key in overrides:
            value = overrides[key]
            shown = "true" if value is True else "false" if value is False else "null" if value is None else value
            parts.append(f"{key}={shown}")
    return ", ".join(parts)


def _default_arms() -> list[ArmSpec]:
    return [ArmSpec(sync_bn=True), ArmSpec(sync_bn=False)]


class StudySpec(BaseModel):
    """A study: `base` run in every arm with every seed; the first arm is the reference of the comparison."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "does syncbn pay on digits",
                    "base": {"model": "small_resnet", "dataset": {"kind": "digits"}, "workers": 2, "batch_size": 2},
                    "arms": [{"sync_bn": True}, {"sync_bn": False}],
                    "seeds": 3,
                }
            ]
        },
    )

    name: str | None = Field(None, max_length=100, description="Optional label shown in listings.")
    base: JobSpec = Field(description="The job every trial starts from (its `seed` is replaced by each trial's seed).")
    arms: list[ArmSpec] = Field(
        default_factory=_default_arms,
        min_length=2,
        max_length=MAX_ARMS,
        description="Variants of the base, each overriding some of sync_bn, sync_group_size, batch_size, workers, "
        "precision; the first is the reference the others are compared against. Default: sync_bn true, then false.",
    )
    seeds: int | list[int] = Field(
        3,
        description=f"N (2 to {MAX_SEEDS}) for seeds 0..N-1, or a list of 2 to {MAX_SEEDS} distinct seeds; every "
        "arm runs every seed, so arms are compared seed by seed (paired).",
    )
    metric: StudyMetric = Field(
        "val_accuracy",
        description="What decides: the best validation accuracy of each trial (higher is better) or its lowest "
        "validation loss.",
    )
    early_stop: bool = Field(
        False,
        description="Stop early: once at least 2 paired seeds are done and every comparison's interval lies wholly "
        "above, inside or below the +-margin band, cancel the trials still queued (running ones finish) and "
        "succeed with that verdict.",
    )
    confidence: float = Field(0.95, ge=0.5, lt=1.0, description="Confidence of the intervals, e.g. 0.95.")
    margin: float | None = Field(
        None,
        ge=0.0,
        le=1e6,
        description="Differences within +-margin are too small to matter (in the metric's units: 0.005 is half an "
        "accuracy point). Default: 0.005 for accuracy, 2 % of the reference arm's mean loss for val_loss.",
    )

    @field_validator("seeds")
    @classmethod
    def _check_seeds(cls, value: int | list[int]) -> int | list[int]:
        if isinstance(value, int):
            if not 2 <= value <= MAX_SEEDS:
                raise ValueError(
                    f"seeds must be between 2 and {MAX_SEEDS} (got {value}): a paired comparison needs at least 2 "
                    f"seeds, and a study runs at most {MAX_SEEDS} per arm."
                )
            return value
        if not 2 <= len(value) <= MAX_SEEDS:
            raise ValueError(f"seeds must list between 2 and {MAX_SEEDS} seeds (got {len(value)}).")
        if len(set(value)) != len(value):
            repeated = sorted({seed for seed in value if value.count(seed) > 1})
            raise ValueError(f"seeds must be distinct (got {repeated} more than once): list each seed once.")
        bad = [seed for seed in value if not 0 <= seed <= 2**31 - 1]
        if bad:
            raise ValueError(f"seeds must be between 0 and 2147483647 (got {bad}).")
        return value

    @model_validator(mode="after")
    def _check_arms(self) -> StudySpec:
        seen: dict[str, int] = {}
        for index, arm in enumerate(self.arms):
            overrides = arm.overrides()
            try:
                merged = self.trial_spec(index, self.seed_list()[0])
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                message = str(first["msg"]).removeprefix("Value error, ")
                field = f"arms[{index}].{where}" if where else f"arms[{index}]"
                raise ValueError(
                    f"{field}: the base with this arm's overrides {overrides} is not a valid job spec: {message}"
                ) from None
            key = merged.model_dump_json(exclude={"name"})
            if key in seen:
                raise ValueError(
                    f"arms[{index}] runs the same job as arms[{seen[key]}] ({arm_label(overrides)}): "
                    "make each arm differ from the others, or remove it."
                )
            seen[key] = index
        return self

    def seed_list(self) -> list[int]:
        """The seeds every arm runs, in order."""
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    def trial_spec(self, arm: int, seed: int) -> JobSpec:
        """The job spec of one trial: the base, the arm's overrides, the seed, and a name saying which it is.

        Raises:
            pydantic.ValidationError: the merged spec is not a valid JobSpec.
        """
        overrides = self.arms[arm].overrides()
        label = self.name or self.base.name or "study"
        name = f"{label} [{arm_label(overrides)}, seed {seed}]"
        if len(name) > 100:
            name = name[:99] + "…"
        data = {**self.base.model_dump(mode="json"), **overrides, "seed": seed, "name": name}
        return JobSpec.model_validate(data)

    def trial_specs(self) -> list[tuple[int, int, JobSpec]]:
        """(arm, seed, spec) of every trial, seed by seed (every arm of the first seed, then of the next): queued
        in this order, the trials finish in pairs, so a verdict (and an early stop) comes as early as it can."""
        return [(arm, seed, self.trial_spec(arm, seed)) for seed in self.seed_list() for arm in range(len(self.arms))]

    def labels(self) -> list[str]:
        """The short name of each arm."""
        return [arm_label(arm.overrides()) for arm in self.arms]

    def sync_only(self) -> bool:
        """Two arms that differ only in `sync_bn`, the reference synchronised: the sentence says "Synchronised
        BatchNorm pays" rather than naming the arms."""
        if len(self.arms) != 2:
            return False
        specs = [self.trial_spec(arm, 0).model_dump(exclude={"name", "sync_bn"}) for arm in range(2)]
        return specs[0] == specs[1] and self.trial_spec(0, 0).sync_bn and not self.trial_spec(1, 0).sync_bn

    def local_arm(self) -> int | None:
        """The first arm with local BatchNorm (sync_bn false): whose layer skew explains the verdict."""
        for arm in range(len(self.arms)):
            if not self.trial_spec(arm, 0).sync_bn:
                return arm
        return None


def load_study_file(path: Path | str) -> StudySpec:
    """Read a study spec from a `.json`, `.yaml` or `.yml` file and validate it.

    Raises:
        ValueError: unknown file type, unreadable content, or a spec that does not validate (pydantic's
            `ValidationError` is a `ValueError` and names each bad field).
    """
    return StudySpec.model_validate(read_spec_mapping(path, "study spec"))
