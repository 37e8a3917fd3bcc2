"""Fixtures of the deploy tests: parsed manifests and the KubeRay CRD validators (read once per session)."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from tests.deploy.manifests import KUBERAY_SCHEMA_DIR, crd_validator, find_object, kuberay_crd_schema


def _kuberay_validator(kind: str) -> jsonschema.Draft7Validator:
    if not KUBERAY_SCHEMA_DIR.is_dir():
        pytest.skip(
            f"KubeRay v1.7.0 CRD schemas not found at {KUBERAY_SCHEMA_DIR} (expected ../shared/schemas/ beside "
            "the checkout): the RayCluster cannot be checked against them here"
        )
    return crd_validator(kuberay_crd_schema(kind))


@pytest.fixture(scope="session")
def raycluster_validator() -> jsonschema.Draft7Validator:
    """Strict validator of KubeRay v1.7.0's RayCluster (ray.io/v1) schema."""
    return _kuberay_validator("RayCluster")


@pytest.fixture(scope="session")
def rayjob_validator() -> jsonschema.Draft7Validator:
    """Strict validator of KubeRay v1.7.0's RayJob (ray.io/v1) schema."""
    return _kuberay_validator("RayJob")


@pytest.fixture()
def raycluster() -> dict[str, Any]:
    """deploy/k8s's RayCluster, freshly parsed (tests may modify their copy)."""
    return find_object("RayCluster")
