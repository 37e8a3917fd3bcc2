"""Reading `deploy/` for the tests: paths, YAML documents, the KubeRay CRD schemas and a compose interpolator.

Nothing here talks to a cluster or a Docker engine. The KubeRay schemas are read from `../shared/schemas/`
beside the checkout (KubeRay v1.7.0's own CustomResourceDefinitions, never copied into the repository).
"""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself depends on tomli before Python 3.11
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy"
K8S_DIR = DEPLOY_DIR / "k8s"
DOCKER_DIR = DEPLOY_DIR / "docker"
COMPOSE_FILE = DEPLOY_DIR / "compose.yaml"
COMPOSE_GPU_FILE = DEPLOY_DIR / "compose.gpu.yaml"
CONSTRAINTS_FILE = DOCKER_DIR / "constraints.txt"
KUBERAY_SCHEMA_DIR = REPO_ROOT.parent / "shared" / "schemas" / "kuberay-v1.7.0"

#: CustomResourceDefinition file of each KubeRay kind, inside KUBERAY_SCHEMA_DIR.
KUBERAY_CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of `path`, in order."""
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.load_all(handle, Loader=_YAML_LOADER) if doc]


def k8s_manifest_files() -> list[Path]:
    """The Kubernetes manifests under deploy/k8s, without the kustomization (not a cluster object)."""
    return sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


def k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    """(file, object) for every object of every manifest under deploy/k8s."""
    return [(path, doc) for path in k8s_manifest_files() for doc in load_documents(path)]


def find_object(kind: str, name: str | None = None) -> dict[str, Any]:
    """The one deploy/k8s object of `kind` (and `name`, when given); fails the test when not exactly one."""
    found = [
        doc for _, doc in k8s_objects() if doc.get("kind") == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    if len(found) != 1:
        raise AssertionError(f"expected exactly one {kind} named {name or '(any)'} in deploy/k8s, got {len(found)}")
    return found[0]


def load_healthcheck() -> ModuleType:
    """deploy/docker/healthcheck.py as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("syncbn_healthcheck", DOCKER_DIR / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pyproject() -> dict[str, Any]:
    """The parsed pyproject.toml of the checkout."""
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def project_version() -> str:
    """[project].version of pyproject.toml: the version every image and manifest must carry."""
    return pyproject()["project"]["version"]


def constraint_pins() -> dict[str, str]:
    """`name==version` lines of deploy/docker/constraints.txt as {normalised name: version}."""
    pins: dict[str, str] = {}
    for raw in CONSTRAINTS_FILE.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise AssertionError(f"constraints.txt: expected 'name==version', got {raw!r}")
        pins[normalise_name(name)] = version.strip()
    return pins


def normalise_name(name: str) -> str:
    """A distribution name in PEP 503 normal form (lower case, runs of -_. as one dash)."""
    return re.sub(r"[-_.]+", "-", name).lower().strip()


def dockerfile_arg(path: Path, name: str) -> str:
    """The default of `ARG name=value` in a Dockerfile; every default of that ARG must agree."""
    values = set(re.findall(rf"^ARG {re.escape(name)}=(\S+)\s*$", path.read_text(encoding="utf-8"), re.MULTILINE))
    if len(values) != 1:
        raise AssertionError(f"{path.name}: expected one default for ARG {name}, got {sorted(values)}")
    return values.pop()


def pod_templates(raycluster: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """("head" or the worker group's name, pod template) for every node group of a RayCluster."""
    yield "head", raycluster["spec"]["headGroupSpec"]["template"]
    for group in raycluster["spec"].get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]


# --- KubeRay CRD schemas --------------------------------------------------------------------------------------


def kuberay_crd_schema(kind: str, version: str = "v1") -> dict[str, Any]:
    """The openAPIV3Schema of `kind` at API `version` from KubeRay's CRD file.

    Raises:
        FileNotFoundError: the shared schema folder is absent (callers skip with a reason).
        KeyError: the CRD has no such version.
    """
    path = KUBERAY_SCHEMA_DIR / KUBERAY_CRD_FILES[kind]
    with path.open(encoding="utf-8") as handle:
        crd = yaml.load(handle, Loader=_YAML_LOADER)
    if crd.get("kind") != "CustomResourceDefinition" or crd["spec"]["names"]["kind"] != kind:
        raise AssertionError(f"{path} is not the CustomResourceDefinition of {kind}")
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    raise KeyError(f"{path.name} has no version {version} (has {[v['name'] for v in crd['spec']['versions']]})")


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of a structural CRD schema that rejects unknown fields, as the API server does under strict
    field validation (`kubectl apply --validate=strict`, kubectl's default): every object schema that lists
    `properties` and neither allows extra keys nor sets `x-kubernetes-preserve-unknown-fields` gets
    `additionalProperties: false`. Without this, a misspelt field would pass JSON-schema validation and then be
    silently pruned by the API server.
    """
    strict = copy.deepcopy(schema)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(strict)
    return strict


def _int_format(bits: int):
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def check(value: object) -> bool:
        return not isinstance(value, int) or isinstance(value, bool) or low <= value <= high

    return check


def crd_validator(schema: dict[str, Any]) -> jsonschema.Draft7Validator:
    """A validator for a CRD schema with the Kubernetes integer formats (int32, int64) checked.

    The CEL rules (`x-kubernetes-validations`) are not evaluated: no offline evaluator exists here, and none
    of them concerns a field our manifests set at creation time (they guard immutability on update).
    """
    checker = jsonschema.FormatChecker(formats=())
    checker.checks("int32")(_int_format(32))
    checker.checks("int64")(_int_format(64))
    return jsonschema.Draft7Validator(strict_schema(schema), format_checker=checker)


def schema_errors(validator: jsonschema.Draft7Validator, document: dict[str, Any]) -> list[str]:
    """Each validation error as 'path: message', sorted, for assertion messages."""
    return sorted(
        f"{'.'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
        for error in validator.iter_errors(document)
    )


# --- compose ----------------------------------------------------------------------------------------------------

_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariableError(ValueError):
    """A `${NAME:?message}` (or `${NAME?message}`) variable was unset: compose refuses to start."""


def interpolate(value: str, env: dict[str, str]) -> str:
    """Resolve compose's variable syntax in `value` against `env`.

    Supports `$NAME`, `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?error}`, `${NAME?error}` and
    `$$` (a literal dollar), the forms deploy/compose.yaml uses.
    """

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["name"] or match["bare"]
        op, arg = match["op"], match["arg"] or ""
        current = env.get(name)
        unset_or_empty = current is None or (op is not None and op.startswith(":") and current == "")
        if op in (":-", "-"):
            return arg if unset_or_empty else current
        if op in (":?", "?"):
            if unset_or_empty:
                raise MissingVariableError(f"{name}: {arg}")
            return current
        return current or ""

    return _INTERPOLATION.sub(replace, value)
