"""k8s/serving: the KServe InferenceService for the exported SavedModel, validated against
KServe's own CRD schema (tests/schemas, with its source, version and licence)."""

import copy
import gzip
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "tests" / "schemas" / "kserve-v0.20.0-inferenceservices-crd.yaml.gz"
KUBECTL = shutil.which("kubectl")


def strict(schema: dict) -> dict:
    """The CRD's OpenAPI schema as a JSON schema that rejects unknown fields (the API server
    would prune them silently: a typo would be lost without a word)."""
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked by the server
    return schema


@pytest.fixture(scope="module")
def isvc_schema() -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # 2 MB of YAML: the C parser
    crd = yaml.load(gzip.decompress(CRD.read_bytes()), Loader=loader)
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    return strict(version["schema"]["openAPIV3Schema"])


@pytest.fixture(scope="module")
def serving_objects() -> list[dict]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: cannot build k8s/serving")
    result = subprocess.run([KUBECTL, "kustomize", str(ROOT / "k8s" / "serving")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]


def inference_service(objects: list[dict]) -> dict:
    [found] = [obj for obj in objects if obj["kind"] == "InferenceService"]
    return found


def test_the_inference_service_matches_kserves_schema(serving_objects, isvc_schema):
    isvc = inference_service(serving_objects)
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    jsonschema.validate(isvc, isvc_schema)


def test_the_schema_check_catches_a_misspelt_field(serving_objects, isvc_schema):
    isvc = copy.deepcopy(inference_service(serving_objects))
    isvc["spec"]["predictor"]["model"]["storageURI"] = isvc["spec"]["predictor"]["model"].pop(
        "storageUri")
    with pytest.raises(jsonschema.ValidationError, match="storageURI"):
        jsonschema.validate(isvc, isvc_schema)


def test_the_predictor_serves_the_saved_model_as_a_non_root_least_privilege_pod(
        serving_objects):
    isvc = inference_service(serving_objects)
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"]["name"] == "tensorflow"  # TF Serving: the SavedModel as is
    assert model["storageUri"].startswith("gs://")
    assert model["resources"]["requests"]["memory"] == model["resources"]["limits"]["memory"]
    assert predictor["securityContext"]["runAsNonRoot"] is True
    assert model["securityContext"]["allowPrivilegeEscalation"] is False
    assert model["securityContext"]["capabilities"]["drop"] == ["ALL"]
    [account] = [obj for obj in serving_objects if obj["kind"] == "ServiceAccount"]
    assert predictor["serviceAccountName"] == account["metadata"]["name"]
    assert account["automountServiceAccountToken"] is False
    assert {obj["metadata"]["namespace"] for obj in serving_objects} == {"mask-rcnn"}
