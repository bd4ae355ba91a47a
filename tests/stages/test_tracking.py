"""MLflow conventions (trainer.stages.tracking) against a SQLite store, and against no server at
all."""

import hashlib
import socket

import pytest

from trainer.stages import tracking
from trainer.stages.tracking import StageTracker, TrackingSettings


@pytest.fixture
def store(tmp_path):
    return tracking.local_tracking_uri(tmp_path)


def settings(uri: str, run_id: str = "kfp-run-1") -> TrackingSettings:
    return TrackingSettings(uri, "test-experiment", run_id, "nightly")


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_stages_of_one_pipeline_run_nest_under_one_parent(store):
    with StageTracker(settings(store), "fetch-weights") as fetch:
        fetch.log_params({"NAME": "demo", "LOSS_WEIGHTS": {"rpn_class_loss": 1.0}}, parent=True)
    with StageTracker(settings(store), "train-heads") as heads:
        heads.log_metrics({"loss": 3.0, "val_loss": None}, step=1)  # None: skipped, not 0
        heads.log_metrics({"loss": 2.0}, step=2)
    with StageTracker(settings(store, "kfp-run-2"), "fetch-weights"):
        pass

    client = tracking.client_for(store)
    exp = client.get_experiment_by_name("test-experiment")
    [parent] = tracking.find_parent_runs(client, exp.experiment_id, "kfp-run-1")
    assert parent.info.run_name == "nightly"
    assert parent.data.params["NAME"] == "demo"
    runs = tracking.stage_runs(client, parent.info.run_id, exp.experiment_id)
    assert [run.info.run_name for run in runs] == ["fetch-weights", "train-heads"]
    assert {run.info.status for run in runs} == {"FINISHED"}
    history = client.get_metric_history(heads.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.0)]
    assert "val_loss" not in client.get_run(heads.run_id).data.metrics
    # SQLite store: artifacts beside the database, per experiment
    assert exp.artifact_location.endswith("/mlartifacts/test-experiment")


def test_a_failing_stage_marks_its_run_and_the_parent_failed_with_the_reason(store):
    with pytest.raises(ValueError, match="bad weights"):
        with StageTracker(settings(store), "fetch-weights") as fetch:
            raise ValueError("bad weights")
    client = tracking.client_for(store)
    stage = client.get_run(fetch.run_id)
    parent = client.get_run(fetch.parent_id)
    assert stage.info.status == parent.info.status == "FAILED"
    assert stage.data.tags["error"] == "ValueError: bad weights"
    assert parent.data.tags["error"] == "fetch-weights: ValueError: bad weights"


def test_racing_stages_converge_on_the_oldest_parent(store):
    """Two parallel first stages may both create a parent; the younger one is deleted."""
    client = tracking.client_for(store)
    exp_id = tracking.experiment_id(client, "test-experiment", store)
    oldest = client.create_run(exp_id, run_name="p", start_time=1000,
                               tags={tracking.PIPELINE_RUN_TAG: "kfp-run-1",
                                     tracking.ROLE_TAG: "pipeline"}).info.run_id

    class Late:
        """The client as the second stage saw it: its first search came before the create."""

        def __init__(self):
            self.searches = 0

        def __getattr__(self, name):
            return getattr(client, name)

        def search_runs(self, *args, **kwargs):
            self.searches += 1
            return [] if self.searches == 1 else client.search_runs(*args, **kwargs)

    winner = tracking.parent_run_id(Late(), exp_id, settings(store))
    assert winner == oldest
    assert len(tracking.find_parent_runs(client, exp_id, "kfp-run-1")) == 1


def test_an_unreachable_server_is_one_clear_warning_and_never_an_exception(tmp_path, capsys):
    uri = f"http://127.0.0.1:{closed_port()}"
    checkpoint = tmp_path / "mask_rcnn_demo_0001.h5"
    checkpoint.write_bytes(b"weights" * 1000)
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()

    ran = False
    with StageTracker(settings(uri), "train-heads") as tracker:
        tracker.log_params({"NAME": "demo"})
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_artifact(checkpoint, "checkpoint")
        callback = tracking.epoch_metrics_callback(tracker)
        callback.on_epoch_end(0, {"loss": 1.0})
        ran = True
    assert ran and tracker.run_id is None
    err = capsys.readouterr().err
    assert err.count("MLflow tracking error") == 1
    assert f"could not start the stage run at {uri}" in err
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == digest


def test_no_tracking_uri_is_reported_not_raised(monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with StageTracker(settings(""), "evaluate") as tracker:
        tracker.log_metrics({"segm_mAP": 0.5})
    assert tracker.run_id is None
    assert "no MLflow tracking URI" in capsys.readouterr().err


def test_the_epoch_callback_logs_each_epoch_with_its_checkpoint_number(store, tmp_path):
    run_folder = tmp_path / "checkpoints" / "demo20260101T0000"
    for split in ("train", "validation"):
        (run_folder / split).mkdir(parents=True)
        (run_folder / split / "events.out.tfevents.1.host").write_bytes(b"events")
    (run_folder / "mask_rcnn_demo_0002.h5").write_bytes(b"not uploaded by the callback")
    with StageTracker(settings(store), "train-all", system_metrics_seconds=0) as tracker:
        callback = tracking.epoch_metrics_callback(tracker, tmp_path / "checkpoints")
        callback.on_epoch_end(1, {"loss": 2.5, "mrcnn_mask_loss": 0.5, "val_loss": 3.0})
    client = tracking.client_for(store)
    run = client.get_run(tracker.run_id)
    assert run.data.metrics == {"loss": 2.5, "mrcnn_mask_loss": 0.5, "val_loss": 3.0}
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [2]
    uploaded = {f.path for f in client.list_artifacts(tracker.run_id,
                                                      "tensorboard/demo20260101T0000/train")}
    assert uploaded == {"tensorboard/demo20260101T0000/train/events.out.tfevents.1.host"}
    assert [f.path for f in client.list_artifacts(tracker.run_id)] == ["tensorboard"]


def test_settings_from_env_take_the_kfp_run_id(monkeypatch):
    monkeypatch.setenv(tracking.RUN_ID_ENV, "0b5c-run")
    monkeypatch.setenv(tracking.RUN_NAME_ENV, "local 20250101")
    found = TrackingSettings.from_env("sqlite:///x.db", "exp")
    assert found == TrackingSettings("sqlite:///x.db", "exp", "0b5c-run", "local 20250101")
    monkeypatch.delenv(tracking.RUN_ID_ENV)
    monkeypatch.delenv(tracking.WORKFLOW_ENV, raising=False)
    assert TrackingSettings.from_env().pipeline_run_id.startswith("unknown-")


def test_without_the_run_id_label_every_retry_is_keyed_by_the_workflow(monkeypatch, capsys):
    # Kubernetes gives an empty value for a label the pod lacks.
    monkeypatch.setenv(tracking.RUN_ID_ENV, "")
    monkeypatch.setenv(tracking.WORKFLOW_ENV, "mask-rcnn-x7k2p")
    first, retry = TrackingSettings.from_env(), TrackingSettings.from_env()
    assert first.pipeline_run_id == retry.pipeline_run_id == "workflow-mask-rcnn-x7k2p"
    assert "keyed by its workflow" in capsys.readouterr().err
    # the run id label, when present, wins
    monkeypatch.setenv(tracking.RUN_ID_ENV, "0b5c-run")
    assert TrackingSettings.from_env().pipeline_run_id == "0b5c-run"
    # neither: a key of its own (a retry cannot find the first attempt's folder)
    monkeypatch.setenv(tracking.RUN_ID_ENV, "")
    monkeypatch.setenv(tracking.WORKFLOW_ENV, "")
    assert TrackingSettings.from_env().pipeline_run_id.startswith("unknown-")


def test_experiments_are_model_training_and_runs_record_their_dataset(tmp_path):
    from trainer.data.prepare import prepare_dataset

    data = tmp_path / "data"
    summary = prepare_dataset("shapes", data, count=3, image_size=64, workers=1,
                              progress=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = TrackingSettings(uri, "kinds", "pipeline-1")
    with StageTracker(settings, "train-heads") as tracker:
        tracker.log_dataset(data, "training")
        run_id = tracker.run_id
    assert tracker.failure is None
    client = tracking.client_for(uri)
    experiment = client.get_experiment_by_name("kinds")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    [dataset_input] = client.get_run(run_id).inputs.dataset_inputs
    assert dataset_input.dataset.digest == summary["fingerprint"][-32:]
    assert dataset_input.dataset.name.startswith("shapes-")
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"


def test_stage_runs_record_system_metrics(tmp_path):
    import time

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with StageTracker(TrackingSettings(uri, "system", "pipeline-1"), "train-all",
                      system_metrics_seconds=0.5) as tracker:
        time.sleep(2.0)
    assert tracker.failure is None
    metrics = tracking.client_for(uri).get_run(tracker.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert metrics["system/system_memory_usage_megabytes"] > 0
