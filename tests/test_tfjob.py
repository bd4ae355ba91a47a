"""Training on several GPU nodes: the TFJob the launcher builds (checked against the training
operator's own CRD schema, tests/schemas) and the launcher itself against a fake Kubernetes API
on 127.0.0.1 (tests/fake_kubernetes.py): create, wait, fail, delete, and a retried task."""

import copy
import gzip
import json
import sys
import types
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.fake_kubernetes import condition, fake_kubernetes
from tests.test_serving_manifests import strict
from trainer.errors import ClusterError, UserError
from trainer.stages import tfjob, tfjob_pod
from trainer.stages.tracking import RUN_ID_ENV, TrackingSettings

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "tests" / "schemas" / "training-operator-v1.8.1-tfjobs-crd.yaml.gz"
RUN_ID = "8f2c1d3e-run"


@pytest.fixture(scope="module")
def tfjob_schema() -> jsonschema.protocols.Validator:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(gzip.decompress(CRD.read_bytes()), Loader=loader)
    assert crd["spec"]["names"]["kind"] == "TFJob"
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)  # once: 500 kB of schema
    return validator(schema)


def stage(tmp_path: Path, workers: int = 2, gpus: int = 4, **changes) -> tfjob.TFJobStage:
    init = tmp_path / "init"
    init.mkdir(exist_ok=True)
    (init / "weights.h5").write_bytes(b"weights")
    values = dict(
        stage="train-all", workers=workers, config_preset="configs/coco.yaml",
        config_yaml="", overrides=["STEPS_PER_EPOCH=10"], layers="all", epochs=3,
        learning_rate=0.0, lr_factor=0.1, dataset_dir="gs://bucket/kfp/prepare-data/dataset",
        init_dir=str(init), exclude=[], checkpoint_root=str(tmp_path / "checkpoints"),
        upstream=False, tracking=TrackingSettings("", "mask-rcnn", RUN_ID),
        pods=tfjob.PodSettings(
            image="ghcr.io/mask-rcnn-pipeline/trainer:0.1.0", gpu_resource="nvidia.com/gpu",
            gpu_count=gpus, cpu="6", memory="24Gi", node_selector={"pool": "gpu"},
            toleration={"key": "nvidia.com/gpu", "operator": "Equal", "value": "present",
                        "effect": "NoSchedule"},
            pvc="mask-rcnn-checkpoints-rwx", mount_path=str(tmp_path),
            service_account="mask-rcnn-pipeline"))
    values.update(changes)
    return tfjob.TFJobStage(**values)


def manifest_of(job: tfjob.TFJobStage) -> dict:
    return tfjob.tfjob_manifest(job, "mask-rcnn", job.dataset_dir, "/mnt/checkpoints/init")


# === The manifest ===


def test_the_tfjob_for_2_nodes_x_4_gpus_passes_the_operators_crd_schema(tmp_path, tfjob_schema):
    manifest = manifest_of(stage(tmp_path, workers=2, gpus=4))
    tfjob_schema.validate(manifest)
    assert (manifest["apiVersion"], manifest["kind"]) == ("kubeflow.org/v1", "TFJob")
    replicas = manifest["spec"]["tfReplicaSpecs"]
    assert {kind: spec["replicas"] for kind, spec in replicas.items()} == {"Chief": 1,
                                                                             "Worker": 1}
    assert replicas["Chief"]["template"] == replicas["Worker"]["template"]  # the same pod
    assert {spec["restartPolicy"] for spec in replicas.values()} == {"ExitCode"}
    pod = replicas["Chief"]["template"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == "mask-rcnn-tfjob"
    assert pod["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mask-rcnn-pipeline"
    spec = pod["spec"]
    assert spec["nodeSelector"] == {"pool": "gpu"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert spec["serviceAccountName"] == "mask-rcnn-pipeline"
    assert spec["automountServiceAccountToken"] is False
    assert spec["volumes"] == [{"name": "checkpoints", "persistentVolumeClaim": {
        "claimName": "mask-rcnn-checkpoints-rwx"}}]
    [container] = spec["containers"]
    assert container["name"] == "tensorflow"  # the operator's container (and TF_CONFIG)
    assert container["ports"] == [{"name": "tfjob-port", "containerPort": 2222,
                                   "protocol": "TCP"}]
    assert container["image"] == "ghcr.io/mask-rcnn-pipeline/trainer:0.1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert container["command"] == ["python", "-m", "trainer.stages.tfjob_pod"]
    arguments = json.loads(container["args"][0])
    assert arguments["overrides"] == ["STEPS_PER_EPOCH=10", "WORKERS=2"]
    assert arguments["gpu_count"] == 4
    assert arguments["dataset_dir"] == "gs://bucket/kfp/prepare-data/dataset"
    assert arguments["out_root"] == str(tmp_path / "checkpoints" / RUN_ID / "train-all.tfjob"
                                        / "out")
    env = {item["name"]: item for item in container["env"]}
    assert env[RUN_ID_ENV]["value"] == RUN_ID
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]["name"] == \
        "mask-rcnn-pipeline-config"
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == \
        "mlflow-pipeline-credentials"


def test_n_workers_are_one_chief_and_n_minus_1_workers(tmp_path, tfjob_schema):
    manifest = manifest_of(stage(tmp_path, workers=5, gpus=1))
    tfjob_schema.validate(manifest)
    assert {k: v["replicas"] for k, v in manifest["spec"]["tfReplicaSpecs"].items()} == {
        "Chief": 1, "Worker": 4}


def test_the_schema_check_catches_a_misspelt_field(tmp_path, tfjob_schema):
    manifest = manifest_of(stage(tmp_path))
    bad = copy.deepcopy(manifest)
    bad["spec"]["tfReplicaSpecs"]["Chief"]["restartpolicy"] = bad["spec"]["tfReplicaSpecs"][
        "Chief"].pop("restartPolicy")
    with pytest.raises(jsonschema.ValidationError, match="restartpolicy"):
        tfjob_schema.validate(bad)
    bad = copy.deepcopy(manifest)
    bad["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["nodeselector"] = {}
    with pytest.raises(jsonschema.ValidationError, match="nodeselector"):
        tfjob_schema.validate(bad)
    bad = copy.deepcopy(manifest)
    bad["spec"]["runPolicy"]["backoffLimit"] = "six"
    with pytest.raises(jsonschema.ValidationError):
        tfjob_schema.validate(bad)


def test_the_job_name_is_stable_per_run_and_stage_and_a_dns_label():
    name = tfjob.job_name(RUN_ID, "train-heads")
    assert name == tfjob.job_name(RUN_ID, "train-heads")  # a retry finds its job
    assert name != tfjob.job_name(RUN_ID, "train-all")
    assert name != tfjob.job_name("another-run", "train-heads")
    assert len(name) <= 52 and name.islower() and name.replace("-", "").isalnum()


def test_bad_stage_settings_are_one_line_errors(tmp_path):
    for changes, message in (({"workers": 1}, "at least 2"), ({"epochs": 0}, "epochs"),
                             ({"tracking": TrackingSettings()}, RUN_ID_ENV)):
        with pytest.raises(UserError, match=message):
            tfjob.check_stage(stage(tmp_path, **changes))
    with pytest.raises(UserError, match="at least 1 GPU"):
        tfjob.check_stage(stage(tmp_path, gpus=0))


# === The launcher against a fake Kubernetes API ===


def api_for(fake) -> tfjob.TFJobApi:
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = fake.url
    configuration.api_key = {"authorization": fake.token}
    configuration.api_key_prefix = {"authorization": "Bearer"}
    return tfjob.TFJobApi(client.ApiClient(configuration), fake.namespace)


CREATED = condition("Created", "TFJobCreated", "TFJob train-all is created.")
RUNNING = condition("Running", "TFJobRunning", "TFJob train-all is running.")
SUCCEEDED = condition("Succeeded", "TFJobSucceeded", "TFJob train-all successfully completed.")
FAILED = condition("Failed", "TFJobFailed", "TFJob train-all has failed because 1 Chief "
                   "replica(s) failed.")


def write_chief_outputs(job: tfjob.TFJobStage, epoch: int = 3) -> None:
    """What the chief's train_stage leaves in {out_root}/chief-0."""
    chief = tfjob.staging_dir(job) / "out" / "chief-0"
    chief.mkdir(parents=True)
    name = f"mask_rcnn_coco_{epoch:04d}.h5"
    (chief / name).write_bytes(b"final checkpoint")
    (chief / "config.yaml").write_text("NAME: coco\n")
    (chief / "summary.json").write_text(json.dumps({
        "checkpoint": f"/mnt/checkpoints/r/train-all/coco20260101T0000/{name}", "epoch": epoch,
        "history": {"loss": [1.5, 1.2], "val_loss": [1.4, 1.3]}}))


def launch(job, fake, out: Path, log: list[str]) -> dict:
    return tfjob.run_tfjob_stage(job, str(out), api_for(fake), poll_seconds=0,
                                 log=log.append, sleep=lambda _: None)


def test_the_launcher_creates_waits_for_and_deletes_a_succeeding_tfjob(tmp_path, tfjob_schema):
    job = stage(tmp_path, dataset_dir=str(tmp_path / "dataset"))
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "dataset.json").write_text("{}")
    name = tfjob.job_name(RUN_ID, "train-all")
    log: list[str] = []
    with fake_kubernetes() as fake:
        fake.claims["mask-rcnn-checkpoints-rwx"] = ["ReadWriteMany"]
        fake.script = [[CREATED], [CREATED, RUNNING], [CREATED, RUNNING],
                       [CREATED, RUNNING, SUCCEEDED]]
        fake.on_step = lambda step, _: step == 3 and write_chief_outputs(job)
        result = launch(job, fake, tmp_path / "model", log)
    base = "/apis/kubeflow.org/v1/namespaces/mask-rcnn/tfjobs"
    assert fake.requests == [
        ("GET", "/api/v1/namespaces/mask-rcnn/persistentvolumeclaims/mask-rcnn-checkpoints-rwx"),
        ("GET", f"{base}/{name}"),  # 404: no job from an earlier attempt
        ("POST", base),
        *[("GET", f"{base}/{name}")] * 4,
        ("DELETE", f"{base}/{name}")]
    [created] = fake.created
    staging = tfjob.staging_dir(job)
    assert created == tfjob.tfjob_manifest(job, "mask-rcnn", str(staging / "dataset"),
                                           str(staging / "init"))
    assert created["metadata"]["name"] == name
    tfjob_schema.validate(created)  # what reached the API server, as the CRD would check it
    assert fake.jobs == {}  # deleted
    # the stage's inputs were put on the shared claim, where the pods read them
    arguments = json.loads(created["spec"]["tfReplicaSpecs"]["Chief"]["template"]["spec"][
        "containers"][0]["args"][0])
    assert (Path(arguments["init_dir"]) / "weights.h5").read_bytes() == b"weights"
    assert (Path(arguments["dataset_dir"]) / "dataset.json").is_file()  # not gs://: copied
    # each condition once, in order, in the task log
    conditions = [line for line in log if ": Created=" in line or ": Running=" in line
                  or ": Succeeded=" in line]
    assert [line.split(": ")[1].split("=")[0] for line in conditions] == [
        "Created", "Running", "Succeeded"]
    # the chief's final checkpoint is the task's Model output, as the single-pod task's
    assert result == {"metrics": {"loss": 1.2, "val_loss": 1.3},
                      "checkpoint": "mask_rcnn_coco_0003.h5", "epoch": 3}
    assert (tmp_path / "model" / "mask_rcnn_coco_0003.h5").read_bytes() == b"final checkpoint"
    assert (tmp_path / "model" / "summary.json").is_file()


def test_a_failed_tfjob_fails_the_task_with_its_reason_and_is_deleted(tmp_path):
    job = stage(tmp_path)
    with fake_kubernetes() as fake:
        fake.claims["mask-rcnn-checkpoints-rwx"] = ["ReadWriteMany"]
        fake.script = [[CREATED], [CREATED, RUNNING], [CREATED, RUNNING, FAILED]]
        with pytest.raises(ClusterError) as failure:
            launch(job, fake, tmp_path / "model", [])
        assert ("DELETE", f"/apis/kubeflow.org/v1/namespaces/mask-rcnn/tfjobs/"
                          f"{tfjob.job_name(RUN_ID, 'train-all')}") in fake.requests
        assert fake.jobs == {}
    message = str(failure.value)
    assert "\n" not in message
    assert "TFJobFailed" in message and "1 Chief replica(s) failed" in message
    assert not (tmp_path / "model").exists()


def test_a_retried_task_adopts_its_running_tfjob_instead_of_starting_another(tmp_path):
    job = stage(tmp_path)
    log: list[str] = []
    with fake_kubernetes() as fake:
        fake.claims["mask-rcnn-checkpoints-rwx"] = ["ReadWriteMany"]
        fake.script = [[CREATED, RUNNING], [CREATED, RUNNING], [CREATED, RUNNING, SUCCEEDED]]
        manifest = manifest_of(job)
        fake.jobs[manifest["metadata"]["name"]] = manifest  # the first attempt's job
        fake.on_step = lambda step, _: step == 2 and write_chief_outputs(job)
        result = launch(job, fake, tmp_path / "model", log)
        assert [method for method, _ in fake.requests].count("POST") == 0
        assert fake.jobs == {}
    assert result["epoch"] == 3
    assert any("found from an earlier attempt" in line for line in log)


def test_a_retried_task_replaces_the_tfjob_that_failed_before(tmp_path):
    job = stage(tmp_path)
    name = tfjob.job_name(RUN_ID, "train-all")
    with fake_kubernetes() as fake:
        fake.claims["mask-rcnn-checkpoints-rwx"] = ["ReadWriteMany"]
        old = manifest_of(job)
        old["status"] = {"conditions": [CREATED, FAILED]}
        fake.jobs[name] = old
        fake.steps[name] = 99  # its status stays
        fake.script = [[CREATED], [CREATED, RUNNING, SUCCEEDED]]
        fake.on_step = lambda step, _: step == 1 and write_chief_outputs(job)
        launch(job, fake, tmp_path / "model", [])
        methods = [method for method, path in fake.requests if path.endswith(name)
                   or path.endswith("tfjobs")]
    # seen failed, deleted, gone, created again (its pods resume from the checkpoints)
    assert methods == ["GET", "DELETE", "GET", "POST", "GET", "GET", "DELETE"]


def test_a_bad_config_stops_the_launcher_before_any_job(tmp_path):
    with fake_kubernetes() as fake:
        fake.claims["mask-rcnn-checkpoints-rwx"] = ["ReadWriteMany"]
        with pytest.raises(UserError, match="STEPS_PER_EPOK"):
            launch(stage(tmp_path, overrides=["STEPS_PER_EPOK=10"]), fake, tmp_path / "m", [])
        assert fake.requests == []


def test_a_claim_that_is_not_read_write_many_stops_the_launcher_before_any_job(tmp_path):
    with fake_kubernetes() as fake:
        fake.claims["mask-rcnn-checkpoints-rwx"] = ["ReadWriteOnce"]
        with pytest.raises(UserError, match="ReadWriteOnce.*ReadWriteMany"):
            launch(stage(tmp_path), fake, tmp_path / "model", [])
        assert fake.created == []


def test_api_refusals_are_one_line_errors_naming_the_role(tmp_path):
    with fake_kubernetes() as fake:
        fake.claims["mask-rcnn-checkpoints-rwx"] = ["ReadWriteMany"]
        fake.fail_create = 403
        with pytest.raises(ClusterError, match=r"HTTP 403: tfjobs is forbidden.*"
                                               r"mask-rcnn-tfjob-launcher"):
            launch(stage(tmp_path), fake, tmp_path / "model", [])
    with fake_kubernetes(token="right") as fake:
        api = api_for(fake)
        fake.token = "other"
        with pytest.raises(ClusterError, match="HTTP 401"):
            api.get("x")


def test_the_watch_rides_out_a_restarting_api_server_but_not_forever(tmp_path):
    job = stage(tmp_path)
    log: list[str] = []
    with fake_kubernetes() as fake:
        fake.claims["mask-rcnn-checkpoints-rwx"] = ["ReadWriteMany"]
        fake.script = [[CREATED, RUNNING], [CREATED, RUNNING, SUCCEEDED]]
        fake.on_step = lambda step, _: step == 1 and write_chief_outputs(job)
        api = api_for(fake)
        api.create(manifest_of(job))
        name = manifest_of(job)["metadata"]["name"]
        fake.unavailable_gets = 3
        assert tfjob.watch(api, name, poll_seconds=0, log=log.append,
                           sleep=lambda _: None)[0] == "Succeeded"
        assert sum("HTTP 503" in line for line in log) == 3
        fake.unavailable_gets = tfjob.WATCH_FAILURES + 1
        with pytest.raises(ClusterError, match="HTTP 503"):
            tfjob.watch(api, name, poll_seconds=0, log=log.append, sleep=lambda _: None)


def test_a_stopped_launcher_deletes_its_job_so_no_gpu_trains_for_a_cancelled_run(tmp_path):
    import os
    import signal

    job = stage(tmp_path)
    polls = []

    def sleep(_):  # the second poll's wait: KFP terminates the run (SIGTERM to the pod)
        polls.append(1)
        if len(polls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    with fake_kubernetes() as fake:
        fake.claims["mask-rcnn-checkpoints-rwx"] = ["ReadWriteMany"]
        fake.script = [[CREATED], [CREATED, RUNNING], [CREATED, RUNNING]]
        with pytest.raises(tfjob.TaskStopped), tfjob.sigterm_stops_the_task():
            tfjob.run_tfjob_stage(job, str(tmp_path / "model"), api_for(fake), poll_seconds=0,
                                  log=lambda _: None, sleep=sleep)
        assert fake.requests[-1][0] == "DELETE" and fake.jobs == {}
    assert signal.getsignal(signal.SIGTERM) == before  # restored


def test_a_job_deleted_while_watched_fails_the_task(tmp_path):
    job = stage(tmp_path)
    with fake_kubernetes() as fake:
        fake.claims["mask-rcnn-checkpoints-rwx"] = ["ReadWriteMany"]
        fake.script = [[CREATED], [CREATED, RUNNING]]
        fake.on_step = lambda step, j: step == 1 and fake.jobs.pop(j["metadata"]["name"])
        with pytest.raises(ClusterError, match="was deleted while"):
            launch(job, fake, tmp_path / "model", [])


def test_outside_a_cluster_the_launcher_says_to_use_one_worker(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ClusterError, match="workers=1"):
        tfjob.TFJobApi.in_cluster()


# === The pod entrypoint ===


def test_the_pod_entrypoint_calls_train_stage_with_the_launchers_arguments(
        tmp_path, monkeypatch, capsys):
    calls = []

    def train_stage(**kwargs):
        calls.append(kwargs)
        return {"metrics": {}, "checkpoint": "mask_rcnn_coco_0003.h5", "epoch": 3}

    # the real module imports TensorFlow: the contract is the call, checked here
    monkeypatch.setitem(sys.modules, "trainer.stages.train",
                        types.SimpleNamespace(train_stage=train_stage))
    job = stage(tmp_path, upstream=True)
    arguments = tfjob.pod_arguments(job, job.dataset_dir, "/claim/init")
    monkeypatch.setenv(RUN_ID_ENV, RUN_ID)
    for kind, index in (("chief", 0), ("worker", 0)):
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {}, "task": {
            "type": kind, "index": index}}))
        assert tfjob_pod.main([json.dumps(arguments)]) == 0
    chief, worker = calls
    assert chief["out_dir"] == f"{arguments['out_root']}/chief-0"
    assert worker["out_dir"] == f"{arguments['out_root']}/worker-0"
    assert chief["upstream"] is True and worker["upstream"] is False  # recorded once
    assert chief["overrides"][-1] == "WORKERS=2" and chief["gpu_count"] == 4
    assert chief["tracking"].pipeline_run_id == RUN_ID
    assert chief["tracking"].experiment == "mask-rcnn"
    # train_stage's own keyword arguments, nothing else
    assert set(chief) == {"config_preset", "config_yaml", "overrides", "gpu_count", "stage",
                          "layers", "epochs", "learning_rate", "lr_factor", "dataset_dir",
                          "init_dir", "exclude", "checkpoint_root", "out_dir", "upstream",
                          "tracking"}


def test_the_pod_entrypoint_fails_bad_input_with_exit_code_2(capsys, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert tfjob_pod.main(["not json"]) == 2
    assert tfjob_pod.main([]) == 2
    assert capsys.readouterr().err.count("\n") == 2  # one line each
    assert tfjob_pod.replica("") == ("chief", 0)
    with pytest.raises(UserError, match="TF_CONFIG"):
        tfjob_pod.replica('{"task": {}}')


def test_the_component_entry_builds_the_stage_from_the_task_and_its_pod(tmp_path, monkeypatch):
    """launch_training, what components/train_tfjob.py calls: gs:// datasets stay in place, the
    pods get the launcher's ServiceAccount and run id, the checkpoint root must be on the claim."""
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "weights.h5").write_bytes(b"w")
    monkeypatch.setenv(RUN_ID_ENV, RUN_ID)
    monkeypatch.setenv(tfjob.SERVICE_ACCOUNT_ENV, "mask-rcnn-pipeline")
    arguments = dict(
        stage="train-heads", workers=3, config_preset="configs/coco.yaml", config_yaml="",
        overrides=[], gpu_count=2, gpu_resource="nvidia.com/gpu", layers="heads", epochs=1,
        learning_rate=0.0, lr_factor=1.0, dataset_path="/gcs/bucket/kfp/dataset",
        dataset_uri="gs://bucket/kfp/dataset", init_dir=str(tmp_path / "weights"), exclude=[],
        checkpoint_root=str(tmp_path / "claim" / "runs"), checkpoint_pvc="shared",
        checkpoint_mount=str(tmp_path / "claim"), upstream=True, mlflow_tracking_uri="",
        mlflow_experiment="", pod_resources={"cpu": "6", "memory": "24Gi"},
        node_selector={"pool": "gpu"}, toleration={"key": "nvidia.com/gpu", "operator": "Exists"},
        image="trainer:test", out_dir=str(tmp_path / "model"))
    with fake_kubernetes() as fake:
        fake.claims["shared"] = ["ReadWriteMany"]
        fake.script = [[CREATED, FAILED]]
        monkeypatch.setattr(tfjob.TFJobApi, "in_cluster", classmethod(lambda cls: api_for(fake)))
        with pytest.raises(ClusterError, match="TFJobFailed"):
            tfjob.launch_training(**arguments)
        with pytest.raises(UserError, match="not on the checkpoint claim"):
            tfjob.launch_training(**{**arguments, "checkpoint_root": "/elsewhere"})
    [created] = fake.created
    assert {k: v["replicas"] for k, v in created["spec"]["tfReplicaSpecs"].items()} == {
        "Chief": 1, "Worker": 2}
    pod = created["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]
    assert pod["serviceAccountName"] == "mask-rcnn-pipeline"
    [container] = pod["containers"]
    assert json.loads(container["args"][0])["dataset_dir"] == "gs://bucket/kfp/dataset"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {e["name"]: e.get("value") for e in container["env"]}[RUN_ID_ENV] == RUN_ID
