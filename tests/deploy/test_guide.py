"""deploy/README.md stays true to the files it describes.

Proves that every deploy/ path the guide names exists, that it installs the KubeRay operator at the version
whose CRD schemas the manifests are validated against, and that the image tags it builds carry the project
version.
"""

from __future__ import annotations

import re

import pytest

from tests.deploy.manifests import DEPLOY_DIR, KUBERAY_SCHEMA_DIR, REPO_ROOT, project_version

GUIDE = DEPLOY_DIR / "README.md"

pytestmark = pytest.mark.timeout(60)


def _guide() -> str:
    return GUIDE.read_text(encoding="utf-8")


def test_every_named_deploy_path_exists() -> None:
    named = set(re.findall(r"\b(deploy/[\w./-]*\w)", _guide()))
    assert len(named) >= 8
    missing = sorted(path for path in named if not (REPO_ROOT / path).exists())
    assert not missing, f"deploy/README.md names files that do not exist: {missing}"


def test_kuberay_operator_version_matches_the_validated_crds() -> None:
    schema_version = KUBERAY_SCHEMA_DIR.name.removeprefix("kuberay-v")
    installs = re.findall(r"helm install kuberay-operator kuberay/kuberay-operator --version (\S+)", _guide())
    assert installs == [schema_version], f"expected one helm install at {schema_version}, got {installs}"


def test_image_tags_carry_the_project_version() -> None:
    tags = set(re.findall(r"syncbn:(\d[\w.]*)-(?:cpu|cuda)", _guide()))
    assert tags == {project_version()}, f"deploy/README.md builds {tags}, pyproject says {project_version()}"
