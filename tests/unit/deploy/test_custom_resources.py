"""Every custom resource we ship, checked against its owner's CRD schema (KServe's and
KubeRay's, as ../shared/k8s-crds/ holds them) the way a cluster with strict field
validation would check it: unknown fields are refused, and so is a misspelled one."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
CRDS = ROOT.parent / "shared" / "k8s-crds"
CRD_FILES = {
    "RayJob": "ray.io_rayjobs.yaml",
    "ServingRuntime": "serving.kserve.io_servingruntimes.yaml",
    "InferenceService": "serving.kserve.io_inferenceservices.yaml",
}
MANIFESTS = [
    "deploy/ray/rayjob.yaml",
    "deploy/kserve/servingruntime.yaml",
    "deploy/kserve/inferenceservice.yaml",
    "deploy/kserve/inferenceservice-canary.yaml",
]

pytestmark = pytest.mark.skipif(not CRDS.is_dir(), reason=f"no CRDs at {CRDS}")


def strict(schema: Any) -> Any:
    """A Kubernetes structural schema as a JSON Schema that refuses unknown fields, as
    `kubectl apply --validate=strict` does: objects with declared properties take no
    others unless the schema preserves unknown fields; int-or-string and nullable as
    Kubernetes reads them."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    preserves = schema.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in schema and "additionalProperties" not in schema and not preserves:
        out["additionalProperties"] = False
    return out


# The CRDs are megabytes of YAML: parsed once, with libyaml where PyYAML has it.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def crd_schema(kind: str, api_version: str) -> dict[str, Any]:
    crd = yaml.load((CRDS / CRD_FILES[kind]).read_text(), Loader=_LOADER)
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group, (kind, api_version)
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert served["served"], f"{api_version} {kind} is not served by this CRD"
    return strict(served["schema"]["openAPIV3Schema"])  # type: ignore[no-any-return]


@functools.cache
def validator(kind: str, api_version: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(crd_schema(kind, api_version))


def problems(doc: dict[str, Any]) -> list[str]:
    check = validator(doc["kind"], doc["apiVersion"])
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in check.iter_errors(doc)
    ]


def custom_resources() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all((ROOT / path).read_text()):
            if doc and doc["kind"] in CRD_FILES:
                out.append((f"{path}:{doc['kind']}", doc))
    return out


@pytest.mark.parametrize(
    ("where", "doc"), [pytest.param(w, d, id=w) for w, d in custom_resources()]
)
def test_custom_resources_match_their_crd_schemas(where: str, doc: dict[str, Any]) -> None:
    assert problems(doc) == [], where


def test_every_custom_resource_kind_we_ship_is_checked() -> None:
    kinds = {doc["kind"] for _, doc in custom_resources()}
    assert kinds == set(CRD_FILES)


@pytest.mark.parametrize(
    ("kind", "path", "misspelt"),
    [
        ("RayJob", ("spec",), "shutdownAfterJobFinishs"),
        ("RayJob", ("spec", "rayClusterSpec", "headGroupSpec"), "rayStartParam"),
        ("ServingRuntime", ("spec",), "protocolVersion"),
        ("InferenceService", ("spec", "predictor", "model"), "storageURI"),
    ],
)
def test_a_misspelled_field_is_refused(kind: str, path: tuple[str, ...], misspelt: str) -> None:
    doc = copy.deepcopy(next(d for _, d in custom_resources() if d["kind"] == kind))
    target = doc
    for key in path:
        target = target[key]
    target[misspelt] = target.get(misspelt.rstrip("s"), "x")
    found = problems(doc)
    assert any(misspelt in p and "Additional properties" in p for p in found), found


def test_a_wrong_type_is_refused() -> None:
    doc = copy.deepcopy(next(d for _, d in custom_resources() if d["kind"] == "InferenceService"))
    doc["spec"]["predictor"]["minReplicas"] = "one"
    assert any("minReplicas" in p for p in problems(doc))


def test_the_rayjob_runs_the_image_the_dockerfile_builds() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    (job,) = [d for _, d in custom_resources() if d["kind"] == "RayJob"]
    cluster = job["spec"]["rayClusterSpec"]
    images = {c["image"] for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]}
    for group in cluster["workerGroupSpecs"]:
        images |= {c["image"] for c in group["template"]["spec"]["containers"]}
    for image in images:
        target = image.split(":", 1)[1]  # imgclf:ray -> the Dockerfile's `ray` target
        assert f" AS {target}\n" in dockerfile, f"no Dockerfile target builds {image}"
