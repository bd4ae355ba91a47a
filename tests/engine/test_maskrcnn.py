"""The matterport-compatible surface: modes, detect() on images of mixed sizes, run folders."""

import numpy as np
import pytest

from trainer import Config, MaskRCNN
from trainer.errors import UserError


@pytest.fixture(scope="module")
def pad64_model():
    config = Config.from_yaml("configs/demo.yaml", [
        "IMAGE_RESIZE_MODE=pad64", "IMAGE_MIN_DIM=64", "DETECTION_MIN_CONFIDENCE=0.0",
        "FPN_CLASSIF_FC_LAYERS_SIZE=64", "TOP_DOWN_PYRAMID_SIZE=32"])
    return MaskRCNN("inference", config)


def test_detect_keeps_order_and_each_images_own_coordinates(pad64_model):
    rng = np.random.default_rng(0)
    shapes = [(64, 96), (128, 64), (64, 96)]  # two molded sizes: two batches, order kept
    images = [rng.integers(0, 255, (*s, 3), dtype=np.uint8) for s in shapes]
    results = pad64_model.detect(images)
    assert len(results) == 3
    for shape, result in zip(shapes, results, strict=True):
        assert result["masks"].shape[:2] == shape
        n = len(result["class_ids"])
        assert result["rois"].shape == (n, 4) and result["scores"].shape == (n,)
        if n:
            assert result["rois"][:, 2].max() <= shape[0] and result["rois"][:, 3].max() <= shape[1]
            assert set(result["class_ids"]) <= {1, 2, 3}


def test_modes_are_checked(pad64_model):
    with pytest.raises(UserError, match="mode must be"):
        MaskRCNN("evaluation", pad64_model.config)
    with pytest.raises(UserError, match=r"shape \[H, W, 3\]"):
        pad64_model.detect([np.zeros((64, 64), np.uint8)])


def test_run_folders_follow_matterport(tmp_path, pad64_model):
    model = MaskRCNN.__new__(MaskRCNN)  # the log-dir rule needs no graph
    model.config, model.model_dir = pad64_model.config, tmp_path
    model.set_log_dir()
    assert model.epoch == 0 and model.log_dir.parent == tmp_path
    assert model.log_dir.name.startswith("demo")
    checkpoint = tmp_path / "demo20260101T1200" / "mask_rcnn_demo_0007.h5"
    model.set_log_dir(checkpoint)
    assert (model.epoch, model.log_dir, model.resume_from) == (7, checkpoint.parent, checkpoint)
    model.set_log_dir(tmp_path / "mask_rcnn_coco.h5")  # released weights start a new run
    assert model.epoch == 0 and model.resume_from is None


def test_detect_runs_every_batch_at_the_configured_size(pad64_model, monkeypatch):
    sizes = []
    predict = pad64_model.keras_model.predict_on_batch

    def recording(inputs):
        sizes.append(len(inputs["input_image"]))
        return predict(inputs)

    monkeypatch.setattr(pad64_model.keras_model, "predict_on_batch", recording)
    image = np.zeros((64, 64, 3), np.uint8)
    assert len(pad64_model.detect([image] * 3)) == 3  # BATCH_SIZE 2: a full batch, then 1 + fill
    assert sizes == [2, 2]
