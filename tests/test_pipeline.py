"""The Kubeflow pipeline: the committed package, its cluster settings, the submit arguments, and
runs through KFP's local runner (`mrcnn run`) against a real MLflow server."""

import base64
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import submit
from pipeline.params import parse_params
from tests.servers import mlflow_model_server, mlflow_server
from trainer.errors import UserError
from trainer.stages.train import resolve_init
from trainer.weights.h5layout import write_layout

ROOT = Path(__file__).resolve().parents[1]
MRCNN = [sys.executable, "-m", "trainer.cli"]
STAGES = ["fetch-weights", "prepare-data", "train-heads", "train-all", "evaluate"]
TRAIN_TASKS = ("exec-train", "exec-train-2")  # the train component, used twice
LAUNCHER_TASKS = ("exec-train-tfjob", "exec-train-tfjob-2")  # workers > 1: train_tfjob, twice


def compiled_documents(path: Path) -> tuple[dict, dict]:
    """(pipeline spec, Kubernetes platform spec) of a compiled package."""
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def all_tasks(spec: dict) -> dict:
    """Every task of the package by name: the root DAG's and those inside condition groups."""
    found = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        found.update(component.get("dag", {}).get("tasks", {}))
    return found


# === The compiled package ===


def test_the_committed_package_is_the_compiled_pipeline(tmp_path):
    fresh = submit.compile_pipeline(tmp_path / "pipeline.yaml")
    assert submit.PACKAGE.read_text() == fresh.read_text(), (
        "pipeline/mask_rcnn_pipeline.yaml is stale: run `mrcnn pipeline compile` and commit it")


def test_training_tasks_request_gpus_on_the_gpu_pool_and_retry():
    spec, executors = compiled_documents(submit.PACKAGE)
    containers = spec["deploymentSpec"]["executors"]
    tasks = all_tasks(spec)
    for name in TRAIN_TASKS:
        resources = containers[name]["container"]["resources"]
        assert resources["accelerator"] == {
            "resourceCount": "{{$.inputs.parameters['pipelinechannel--gpu_count']}}",
            "resourceType": "{{$.inputs.parameters['pipelinechannel--gpu_type']}}"}
        assert resources["cpuRequest"] > 0 and resources["memoryRequest"] > 0
        platform = executors[name]
        assert platform["nodeSelector"] == {"labels": {"pool": "gpu"}}
        assert platform["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Equal",
                                            "value": "present", "effect": "NoSchedule"}]
        assert platform["pvcMount"][0]["mountPath"] == "/mnt/checkpoints"
    for task in ("train", "train-2"):
        assert tasks[task]["retryPolicy"]["maxRetryCount"] >= 1
        assert not tasks[task]["cachingOptions"].get("enableCache")
    for task in ("fetch-weights", "prepare-data"):
        assert tasks[task]["cachingOptions"]["enableCache"] is True
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["gpu_count"]["defaultValue"] == 1
    assert params["gpu_type"]["defaultValue"] == "nvidia.com/gpu"


def test_the_run_folder_is_cleaned_after_evaluate_on_the_checkpoint_volume():
    spec, executors = compiled_documents(submit.PACKAGE)
    tasks = all_tasks(spec)
    assert spec["root"]["inputDefinitions"]["parameters"]["keep_checkpoints"][
        "defaultValue"] is False
    for name, evaluate in (("clean-checkpoints", "evaluate"),  # workers == 1, then TFJobs
                           ("clean-checkpoints-2", "evaluate-2")):
        task = tasks[name]
        assert task["dependentTasks"] == [evaluate]  # runs only once evaluate has succeeded
        assert task["inputs"]["parameters"]["keep_checkpoints"] == {
            "componentInputParameter": "pipelinechannel--keep_checkpoints"}
        platform = executors[f"exec-{name}"]
        assert platform["pvcMount"][0]["mountPath"] == "/mnt/checkpoints"
        assert platform["pvcMount"][0]["componentInputParameter"] == \
            "pipelinechannel--checkpoint_pvc"
        assert "nodeSelector" not in platform  # no GPU node for a folder removal
        resources = spec["deploymentSpec"]["executors"][f"exec-{name}"]["container"][
            "resources"]
        assert "accelerator" not in resources


def test_every_task_gets_the_tracking_uri_credentials_run_key_and_pod_labels():
    spec, executors = compiled_documents(submit.PACKAGE)
    assert set(executors) == set(spec["deploymentSpec"]["executors"])  # all five task kinds
    for name, platform in executors.items():
        [config_map] = platform["configMapAsEnv"]
        assert config_map["configMapName"] == "mask-rcnn-pipeline-config", name
        assert config_map["keyToEnv"] == [
            {"configMapKey": "MLFLOW_TRACKING_URI", "envVar": "MLFLOW_TRACKING_URI"},
            {"configMapKey": "MLFLOW_EXPERIMENT_NAME", "envVar": "MLFLOW_EXPERIMENT_NAME"}]
        # MLflow's basic-auth user of the pipeline, read by MLflow's client from these names
        [secret] = platform["secretAsEnv"]
        assert secret["secretName"] == "mlflow-pipeline-credentials", name
        assert secret["keyToEnv"] == [
            {"secretKey": "username", "envVar": "MLFLOW_TRACKING_USERNAME"},
            {"secretKey": "password", "envVar": "MLFLOW_TRACKING_PASSWORD"}]
        # the run id, and the workflow's name that keys the run when the run id label is missing
        # (the TFJob launcher also reads its ServiceAccount's name, for the job's pods)
        fields = platform["fieldPathAsEnv"]
        if name in LAUNCHER_TASKS:
            assert fields.pop(0) == {"fieldPath": "spec.serviceAccountName",
                                     "name": "MRCNN_SERVICE_ACCOUNT"}
        assert fields == [
            {"fieldPath": "metadata.labels['pipeline/runid']", "name": "MRCNN_PIPELINE_RUN_ID"},
            {"fieldPath": "metadata.labels['workflows.argoproj.io/workflow']",
             "name": "MRCNN_PIPELINE_WORKFLOW"}]
        # the labels k8s/base/networkpolicies.yaml selects task pods by (tests/test_deploy.py)
        assert platform["podMetadata"]["labels"] == {
            "app.kubernetes.io/part-of": "mask-rcnn-pipeline",
            "app.kubernetes.io/name": "mask-rcnn-task"}


def test_workers_chooses_the_single_pod_gpu_tasks_or_the_cpu_only_tfjob_launchers():
    spec, executors = compiled_documents(submit.PACKAGE)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["workers"] == {"defaultValue": 1, "isOptional": True,
                                 "parameterType": "NUMBER_INTEGER"}
    [branches] = [task for name, task in spec["root"]["dag"]["tasks"].items()
                  if name.startswith("condition-branches")]
    group = spec["components"][branches["componentRef"]["name"]]["dag"]["tasks"]
    by_condition = {}
    for task in group.values():
        inner = spec["components"][task["componentRef"]["name"]]["dag"]["tasks"]
        by_condition[task["triggerPolicy"]["condition"]] = {
            inner_task["componentRef"]["name"].removeprefix("comp-")
            for inner_task in inner.values()}
    single = "int(inputs.parameter_values['pipelinechannel--workers']) == 1"
    assert by_condition == {
        single: {"train", "train-2", "evaluate", "clean-checkpoints"},
        f"!({single})": {"train-tfjob", "train-tfjob-2", "evaluate-2", "clean-checkpoints-2"}}
    containers = spec["deploymentSpec"]["executors"]
    tasks = all_tasks(spec)
    for name in LAUNCHER_TASKS:
        # the launcher waits for the TFJob: no GPU, no GPU pool, but the shared claim
        resources = containers[name]["container"]["resources"]
        assert "accelerator" not in resources
        assert resources["cpuRequest"] <= 1
        platform = executors[name]
        assert "nodeSelector" not in platform and "tolerations" not in platform
        assert platform["pvcMount"][0]["mountPath"] == "/mnt/checkpoints"
    for name, stage, init in (("train-tfjob", "train-heads",
                               "pipelinechannel--fetch-weights-weights"),
                              ("train-tfjob-2", "train-all", "train-tfjob")):
        task = tasks[name]
        assert task["retryPolicy"]["maxRetryCount"] >= 1
        assert not task["cachingOptions"].get("enableCache")
        inputs = task["inputs"]["parameters"]
        assert inputs["stage"]["runtimeValue"]["constant"] == stage
        assert inputs["workers"]["componentInputParameter"] == "pipelinechannel--workers"
        # the pods' placement and size are the single-pod task's
        assert inputs["node_selector"]["runtimeValue"]["constant"] == {"pool": "gpu"}
        assert inputs["toleration"]["runtimeValue"]["constant"]["key"] == "nvidia.com/gpu"
        assert inputs["pod_resources"]["runtimeValue"]["constant"] == {"cpu": "6",
                                                                       "memory": "24Gi"}
        artifact = task["inputs"]["artifacts"]["init"]
        assert (artifact.get("taskOutputArtifact", {}).get("producerTask")
                or artifact["componentInputArtifact"]) == init
    assert tasks["evaluate-2"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"][
        "producerTask"] == "train-tfjob-2"


def test_components_run_the_package_version_image():
    from trainer.version import IMAGE

    spec, _ = compiled_documents(submit.PACKAGE)
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {IMAGE}


# === Parameters ===


def test_submit_arguments_come_from_params_then_the_config_map_environment(tmp_path):
    environ = {"CONFIG_PRESET": "configs/coco.yaml", "HEADS_EPOCHS": "40",
               "TOTAL_EPOCHS": "160", "WEIGHTS_SOURCE": "gs://b/w.h5", "KFP_HOST": "x",
               "MIN_MAP": "0.3"}
    arguments = submit.run_arguments(submit.PACKAGE, ["total_epochs=2",
                                                      "weights_exclude=[mrcnn_mask]"], environ)
    assert arguments["heads_epochs"] == 40 and arguments["total_epochs"] == 2
    assert arguments["weights_source"] == "gs://b/w.h5"
    assert arguments["min_map"] == 0.3  # the registration gate from the ConfigMap
    assert arguments["weights_exclude"] == ["mrcnn_mask"]
    # a preset that exists here is also sent as its resolved YAML; the image has its own copy
    assert arguments["config_preset"] == "configs/coco.yaml"
    assert yaml.safe_load(arguments["config_yaml"])["NAME"] == "coco"
    assert "config_yaml" not in submit.run_arguments(submit.PACKAGE, [], {})
    # a preset only the image has is sent as its path, for the tasks to read there
    inside = submit.run_arguments(submit.PACKAGE, ["config_preset=configs/elsewhere.yaml"], {})
    assert inside == {"config_preset": "configs/elsewhere.yaml"}


def test_a_stage_reads_the_config_from_yaml_text_or_from_a_preset_never_guessing(tmp_path):
    from trainer.stages.inputs import stage_config

    preset = tmp_path / "preset.yaml"
    preset.write_text("NAME: from_file\nNUM_CLASSES: 3\n")
    text = "NAME: from_text\nNUM_CLASSES: 5\n"
    assert stage_config(str(preset), "", ["IMAGES_PER_GPU=1"]).NAME == "from_file"
    config = stage_config(str(preset), text, ["IMAGES_PER_GPU=1"])  # the text wins when given
    assert (config.NAME, config.NUM_CLASSES, config.IMAGES_PER_GPU) == ("from_text", 5, 1)
    # a path-looking text is still YAML text, and YAML text is never taken for a path
    with pytest.raises(UserError, match="config_yaml: expected a mapping"):
        stage_config(str(preset), "configs/demo.yaml")
    with pytest.raises(UserError, match="does not exist"):
        stage_config("NAME: inline", "")
    with pytest.raises(UserError, match="config_preset"):
        stage_config("", "")


@pytest.mark.parametrize("param, message", [
    ("epochs=3", "NAME one of"),
    ("heads_epochs=three", "not a number_integer"),
    ("weights_exclude=mrcnn_mask", "not a list"),
])
def test_bad_parameters_are_one_line_errors(param, message):
    with pytest.raises(UserError, match=message):
        submit.run_arguments(submit.PACKAGE, [param], {})
    with pytest.raises(UserError):
        parse_params([param])


def test_schedule_refuses_a_malformed_cron():
    with pytest.raises(UserError, match="expected 5 fields"):
        submit.schedule("http://127.0.0.1:1", "0 3 * *")


# === Where a train task starts (the retry-on-preemption path) ===


@pytest.fixture
def demo_config():
    from trainer.config import Config

    return Config.from_yaml(ROOT / "configs" / "demo.yaml")


def test_a_retried_train_task_resumes_from_its_own_newest_checkpoint(tmp_path, demo_config):
    model_dir = tmp_path / "checkpoints" / "run-1" / "train-all"
    for epoch in (2, 3):
        path = model_dir / "demo20250101T1200" / f"mask_rcnn_demo_{epoch:04d}.h5"
        write_layout(path, {}, keras_version="3")  # resume reads checkpoints' metadata
    heads = tmp_path / "heads-model"
    heads.mkdir()
    (heads / "mask_rcnn_demo_0001.h5").write_bytes(b"heads")
    init, why = resolve_init(str(heads), model_dir, demo_config)
    assert init == "last" and "retried" in why  # not the heads' checkpoint again


def test_the_all_layers_stage_continues_the_heads_checkpoint_in_its_own_folder(
        tmp_path, demo_config):
    heads = tmp_path / "heads-model"
    heads.mkdir()
    write_layout(heads / "mask_rcnn_demo_0001.h5", {}, keras_version="3")
    original = (heads / "mask_rcnn_demo_0001.h5").read_bytes()
    (heads / "summary.json").write_text(json.dumps(
        {"log_dir": "/elsewhere/train-heads/demo20250101T1200"}))
    model_dir = tmp_path / "train-all"
    init, _ = resolve_init(str(heads), model_dir, demo_config)
    # inside a run folder, so training continues at epoch 1 and writes beside it
    assert init == str(model_dir / "demo20250101T1200" / "mask_rcnn_demo_0001.h5")
    assert Path(init).read_bytes() == original
    assert (heads / "mask_rcnn_demo_0001.h5").read_bytes() == original  # input untouched
    # a retry of this task before its first epoch ends finds the copy: the same start
    assert resolve_init(str(heads), model_dir, demo_config)[0] == "last"


def test_the_heads_stage_loads_fetched_weights_or_starts_from_random(tmp_path, demo_config):
    fetched = tmp_path / "weights"
    fetched.mkdir()
    assert resolve_init(str(fetched), tmp_path / "a", demo_config)[0] == "none"
    (fetched / "weights.h5").write_bytes(b"coco")
    assert resolve_init(str(fetched), tmp_path / "b", demo_config)[0] == \
        str(fetched / "weights.h5")


# === Local runs (kfp.local) ===


def saved_model_detections(path: Path, image: bytes) -> dict:
    import tensorflow as tf

    out = tf.saved_model.load(str(path)).signatures["serving_default"](
        images=tf.constant([image]))
    count = int(out["num_detections"][0])
    return {"boxes": out["boxes"][0][:count].numpy().tolist(),
            "scores": out["scores"][0][:count].numpy().tolist(),
            "class_ids": out["class_ids"][0][:count].numpy().tolist(),
            "class_names": [n.decode() for n in out["class_names"][0][:count].numpy()]}


def mrcnn_run(workdir: Path, *args: str, uri: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    return subprocess.run([*MRCNN, "run", "--workdir", str(workdir), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1500)


def test_a_bad_weights_source_fails_the_run_in_fetch_weights_with_its_reason(tmp_path):
    missing = tmp_path / "no-such-weights.h5"
    result = mrcnn_run(tmp_path / "work", "--param", f"weights_source={missing}")
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    [message] = result.stderr.strip().splitlines()[-1:]
    assert message.startswith("mrcnn run: error: stage fetch-weights failed: ")
    assert str(missing) in message
    assert "Executing task 'prepare-data'" not in result.stdout + result.stderr


TINY = ["--set", "STEPS_PER_EPOCH=2", "--set", "VALIDATION_STEPS=1",
        "--param", "dataset_count=24", "--param", "val_fraction=0.25",
        "--param", "heads_epochs=1", "--param", "total_epochs=2",
        "--param", "evaluation_limit=4", "--param", "num_pictures=2", "--param", "min_map=0",
        "--param", "mlflow_experiment=e2e", "--param", "keep_checkpoints=false"]
LOSSES = ["loss", "rpn_class_loss", "rpn_bbox_loss", "mrcnn_class_loss", "mrcnn_bbox_loss",
          "mrcnn_mask_loss"]
EVALUATION = ["bbox_mAP", "bbox_mAP50", "segm_mAP", "segm_mAP50", "voc_mAP50"]


def artifact_paths(client, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path or None):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


@pytest.mark.slow
def test_the_whole_pipeline_runs_locally_and_tracks_every_stage_in_mlflow(tmp_path):
    from mlflow import MlflowClient

    with mlflow_server(tmp_path / "mlflow") as url:
        result = mrcnn_run(tmp_path / "work", *TINY, "--json", uri=url)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        summary = json.loads(result.stdout[result.stdout.rindex("\n{\n") + 1:])  # after the logs
        assert [row["stage"] for row in summary["stages"]] == STAGES
        assert summary["tracking_uri"] == url

        client = MlflowClient(url)
        exp = client.get_experiment_by_name("e2e")
        [parent] = client.search_runs(
            [exp.experiment_id], f"tags.pipeline_run_id = '{summary['pipeline_run_id']}' "
            "and tags.`mrcnn.role` = 'pipeline'")
        assert parent.info.status == "FINISHED"
        children = client.search_runs(
            [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        runs = {run.info.run_name: run for run in children}
        assert sorted(runs) == sorted(STAGES) and len(children) == 5
        assert {run.info.status for run in children} == {"FINISHED"}
        for run in children:
            assert run.data.params["NAME"] == "demo"  # the resolved config
            assert run.data.params["STEPS_PER_EPOCH"] == "2"

        # per-epoch losses, step = epoch: heads epoch 1, all layers epoch 2
        for stage, epoch in (("train-heads", 1), ("train-all", 2)):
            run = runs[stage]
            for key in [*LOSSES, *(f"val_{k}" for k in LOSSES)]:
                history = client.get_metric_history(run.info.run_id, key)
                assert [m.step for m in history] == [epoch], (stage, key)
        for key in EVALUATION:
            assert key in runs["evaluate"].data.metrics
            assert key in parent.data.metrics
        assert parent.data.metrics["gate_passed"] == 1.0  # min_map 0: the gate passes

        artifacts = {stage: artifact_paths(client, run.info.run_id)
                     for stage, run in runs.items()}
        assert all("config.yaml" in paths for paths in artifacts.values())
        assert "weights/report.json" in artifacts["fetch-weights"]
        assert "dataset/dataset.json" in artifacts["prepare-data"]
        assert "checkpoint/mask_rcnn_demo_0001.h5" in artifacts["train-heads"]
        assert "checkpoint/mask_rcnn_demo_0002.h5" in artifacts["train-all"]
        assert {"evaluation/metrics.json", "evaluation/report.md"} <= artifacts["evaluate"]
        assert any(p.startswith("evaluation/pictures/") for p in artifacts["evaluate"])

        # registered when the gate passes, from the evaluate run, aliased champion
        [version] = client.search_model_versions("name = 'mask-rcnn'")
        assert version.run_id == runs["evaluate"].info.run_id
        assert parent.data.tags["registered_model"] == f"mask-rcnn/{version.version}"
        assert client.get_model_version_by_alias("mask-rcnn", "champion").version == \
            version.version
        assert version.tags["pipeline_run_id"] == summary["pipeline_run_id"]
        assert set(EVALUATION) <= set(version.tags)

        # the champion serves over REST what the exported SavedModel detects
        [saved_model] = (tmp_path / "work" / "kfp").glob(
            "mask-rcnn-*/evaluate/evaluation/saved_model")
        image = next((tmp_path / "work").glob("**/evaluation/pictures/*.png")).read_bytes()
        with mlflow_model_server("models:/mask-rcnn@champion", url,
                                 tmp_path / "serve") as model_url:
            request = {"dataframe_split": {"columns": ["image"],
                                           "data": [[base64.b64encode(image).decode()]]}}
            response = urllib.request.urlopen(urllib.request.Request(
                f"{model_url}/invocations", data=json.dumps(request).encode(),
                headers={"Content-Type": "application/json"}), timeout=120)
            [served] = json.loads(response.read())["predictions"]
        direct = saved_model_detections(saved_model, image)
        assert served["class_ids"] == direct["class_ids"]
        assert served["class_names"] == direct["class_names"]
        assert np.allclose(served["boxes"], direct["boxes"], atol=0.5)
        assert np.allclose(served["scores"], direct["scores"], atol=1e-4)
        assert len(served["masks"]) == len(served["scores"])

    # clean-checkpoints removed the run's folder; the final checkpoint is train-all's artifact
    assert list((tmp_path / "work" / "checkpoints").iterdir()) == []
    assert list((tmp_path / "work" / "kfp").glob("mask-rcnn-*/train-2/model/*_0002.h5"))

    # KFP's own outputs: the metrics artifact of evaluate, the reports
    [output] = (tmp_path / "work" / "kfp").glob("mask-rcnn-*/evaluate/executor_output.json")
    metrics = json.loads(output.read_text())["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    for key in EVALUATION:
        assert metrics[key] == pytest.approx(runs["evaluate"].data.metrics[key])
    report = output.parent / "report"
    assert report.read_text().startswith("#")
    assert "data:image/png;base64," in (output.parent / "pictures").read_text()


def test_from_random_initialisation_the_heads_stage_trains_all_layers():
    from trainer.stages.train import stage_layers

    assert stage_layers("heads", "none") == "all"
    assert stage_layers("heads", "/w/weights.h5") == "heads"  # fetched weights: matterport's
    assert stage_layers("all", "/ckpt/mask_rcnn_demo_0001.h5") == "all"


def test_cached_tasks_get_only_what_decides_their_results():
    spec, _ = compiled_documents(submit.PACKAGE)
    tasks = spec["root"]["dag"]["tasks"]
    inputs = {name: set(tasks[name]["inputs"]["parameters"])
              for name in ("fetch-weights", "prepare-data")}
    assert inputs == {"fetch-weights": {"model_config", "source", "sha256", "exclude"},
                      "prepare-data": {"source", "count", "val_fraction", "image_size"}}
    for name in ("fetch-weights", "prepare-data"):
        assert tasks[name]["cachingOptions"]["enableCache"] is True
    # what resolve-config gives them ignores training and MLflow settings
    from trainer.stages.inputs import task_inputs

    preset = str(ROOT / "configs" / "demo.yaml")
    base = task_inputs(preset, "", [])
    assert task_inputs(preset, "", ["LEARNING_RATE=0.5", "STEPS_PER_EPOCH=7"]) == base
    assert task_inputs(preset, "", ["NUM_CLASSES=5"])["model_config"] != base["model_config"]
    assert task_inputs(preset, "", ["IMAGE_MIN_DIM=64", "IMAGE_MAX_DIM=64"])["image_size"] == 64


def test_the_tfjob_launcher_collects_what_train_stage_writes():
    from trainer.stages import tfjob
    from trainer.stages import train as train_module
    from trainer.stages.tracking import run_folder

    # one run folder rule (trainer.stages.tracking) for train_stage, the launcher, the cleanup
    assert run_folder("/ckpt", "a/b c") == Path("/ckpt/a_b_c")
    assert run_folder("/ckpt", "") == Path("/ckpt/run")
    assert tfjob.SUMMARY_FILE == train_module.SUMMARY_FILE  # what the launcher collects
