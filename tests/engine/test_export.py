"""trainer.engine.export: the SavedModel serves the same detections as `MaskRCNN.detect()`,
loaded in a fresh Python process that never imports `trainer`."""

import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from PIL import Image

from trainer.config import Config
from trainer.engine.export import export_saved_model
from trainer.engine.maskrcnn import MaskRCNN
from trainer.errors import UserError
from trainer.weights.by_name import save_weights

CLASS_NAMES = ["BG", "square", "circle", "triangle"]
# Random weights score every class near 1/4: a low threshold gives detections to compare.
SETTINGS = ["DETECTION_MIN_CONFIDENCE=0.2", "IMAGES_PER_GPU=1"]

# Run in a fresh interpreter: only TensorFlow and NumPy, as a serving host would have.
CLIENT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    model = tf.saved_model.load(sys.argv[1])
    images = [open(path, "rb").read() for path in sys.argv[3:]]
    out = model.signatures["serving_default"](images=tf.constant(images))
    results = []
    for i, path in enumerate(sys.argv[3:]):
        n = int(out["num_detections"][i])
        height, width = tf.io.decode_image(images[i], channels=3).shape[:2]
        boxes = out["boxes"][i][:n].numpy()
        full = np.zeros((height, width, n), bool)  # paste each mask into its box
        for k, (y1, x1, y2, x2) in enumerate(boxes.astype(int)):
            mask = tf.image.resize(out["masks"][i][k][..., None], (y2 - y1, x2 - x1))
            full[y1:y2, x1:x2, k] = mask.numpy()[..., 0] >= 0.5
        np.save(path + ".masks.npy", full)
        results.append({"boxes": boxes.tolist(), "scores": out["scores"][i][:n].numpy().tolist(),
                        "class_ids": out["class_ids"][i][:n].numpy().tolist(),
                        "class_names": [s.decode() for s in out["class_names"][i][:n].numpy()]})
    assert "trainer" not in sys.modules
    json.dump(results, open(sys.argv[2], "w"))
""")


@pytest.mark.slow
def test_the_saved_model_detects_what_detect_does_without_trainer(tmp_path):
    keras.utils.set_random_seed(3)
    config = Config.from_yaml("configs/demo.yaml", SETTINGS)
    model = MaskRCNN("inference", config)
    save_weights(model.keras_model, tmp_path / "weights.h5")
    out = export_saved_model(config, tmp_path / "weights.h5", tmp_path / "export",
                             class_names=CLASS_NAMES)
    assert (out / "saved_model.pb").is_file()

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (96, 150, 3), dtype=np.uint8),  # resized and padded
              rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)]
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"image-{i}.png")
        Image.fromarray(image).save(paths[-1])
    result = subprocess.run([sys.executable, "-c", CLIENT, str(out), str(tmp_path / "out.json"),
                             *map(str, paths)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads((tmp_path / "out.json").read_text())

    expected = model.detect(images)
    for path, got, want in zip(paths, served, expected, strict=True):
        assert len(want["class_ids"]) > 0  # the comparison is not vacuous
        assert got["class_ids"] == want["class_ids"].tolist()
        assert got["class_names"] == [CLASS_NAMES[c] for c in want["class_ids"]]
        np.testing.assert_allclose(got["boxes"], want["rois"], atol=1.0)
        np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-4)
        masks = np.load(str(path) + ".masks.npy")
        for k in range(masks.shape[-1]):
            a, b = masks[..., k], want["masks"][..., k]
            union = np.logical_or(a, b).sum()
            assert union == 0 or np.logical_and(a, b).sum() / union >= 0.99


def test_export_refuses_what_it_cannot_serve(tmp_path):
    config = Config.from_yaml("configs/demo.yaml")
    with pytest.raises(UserError, match="IMAGE_RESIZE_MODE=square"):
        export_saved_model(config.replace(IMAGE_RESIZE_MODE="pad64"), tmp_path / "w.h5",
                           tmp_path / "out")
    with pytest.raises(UserError, match="3 class names for NUM_CLASSES=4"):
        export_saved_model(config, tmp_path / "w.h5", tmp_path / "out",
                           class_names=["BG", "a", "b"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "w.h5").write_bytes(b"")
    with pytest.raises(UserError, match="not a SavedModel folder"):
        export_saved_model(config, tmp_path / "w.h5", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"

