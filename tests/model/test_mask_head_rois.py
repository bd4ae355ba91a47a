"""MASK_HEAD_ROIS only changes how the graphs run the mask head: in training on the positives
found ("dynamic") or on every positive slot, padding included ("static"), at inference on the
detections found or on every detection slot. Same weights, same losses, same gradients, same
masks; and an image with no positive ROI at all still trains."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.config import Config
from trainer.data import shapes
from trainer.data.memory import examples_dataset
from trainer.engine.inference import mold_inputs
from trainer.model.mask_rcnn import build_inference_model, build_training_model

OVERRIDES = ["NORM=batch", "TRAIN_BN=true", "TOP_DOWN_PYRAMID_SIZE=64",
             "FPN_CLASSIF_FC_LAYERS_SIZE=64", "PROPOSALS_INCLUDE_GT=true"]


def losses_and_gradients(model, batch):
    tf.random.set_seed(7)  # the same ROI sampling in both graphs
    with tf.GradientTape() as tape:
        outputs = model(batch, training=True)
        values = model.compute_losses(batch, outputs)
        total = tf.add_n(list(values.values()))
    # layer name / weight name: the wrapped layers' own names differ between two graphs
    names = [f"{v.path.split('/')[0]}/{v.path.split('/')[-1]}"
             for v in model.trainable_variables]
    gradients = tape.gradient(total, model.trainable_variables)
    return ({k: float(v) for k, v in values.items()},
            {n: g for n, g in zip(names, gradients, strict=True) if "mrcnn_mask" in n},
            outputs)


def build_pair(overrides, static_too: bool = True):
    keras.utils.set_random_seed(0)
    config = Config.from_yaml("configs/demo.yaml", overrides)
    dynamic = build_training_model(config.replace(MASK_HEAD_ROIS="dynamic"))
    static = None
    if static_too:
        static = build_training_model(config.replace(MASK_HEAD_ROIS="static"))
        for layer in [la for la in dynamic.layers if la.weights]:  # by name, as checkpoints do
            static.get_layer(layer.name).set_weights(layer.get_weights())
    samples = [shapes.generate_sample(seed, 128, 128, 2, 3) for seed in (3, 4)]
    batch = next(iter(examples_dataset(samples, config)))
    return dynamic, static, batch


@pytest.mark.slow
def test_dynamic_and_static_mask_head_give_the_same_losses_and_gradients():
    dynamic, static, batch = build_pair(OVERRIDES)
    loss_d, grad_d, out_d = losses_and_gradients(dynamic, batch)
    loss_s, grad_s, out_s = losses_and_gradients(static, batch)
    valid = np.asarray(out_s["roi_valid"])[:, : out_s["target_mask"].shape[1]]
    assert valid.sum() > 0  # ground-truth boxes are among the ROIs: positives exist
    np.testing.assert_allclose(np.asarray(out_d["rois"]), np.asarray(out_s["rois"]))
    np.testing.assert_allclose(np.asarray(out_d["mrcnn_mask_logits"])[valid],
                               np.asarray(out_s["mrcnn_mask_logits"])[valid],
                               rtol=1e-4, atol=1e-4)
    assert loss_d == pytest.approx(loss_s, rel=1e-4, abs=1e-6)
    assert grad_d.keys() == grad_s.keys() and len(grad_d) >= 12
    # The dynamic head's BatchNorms are the fused op over real ROIs, the static head's a
    # weighted mean and variance over its slots: the same statistics, rounded differently
    # (with oneDNN's batch norm about 1e-3 of a gradient's norm; a wrong statistic is O(1)).
    for name in grad_d:
        got, want = np.asarray(grad_d[name]), np.asarray(grad_s[name])
        # + 1e-7: the conv biases before a BatchNorm have a zero gradient up to rounding
        assert np.linalg.norm(got - want) <= 5e-3 * np.linalg.norm(want) + 1e-7, name


def test_no_positive_roi_trains_with_a_zero_mask_loss():
    dynamic, _, batch = build_pair(OVERRIDES, static_too=False)  # no object: no positive ROI
    batch = dict(batch, input_gt_class_ids=tf.zeros_like(batch["input_gt_class_ids"]))
    losses, gradients, outputs = losses_and_gradients(dynamic, batch)
    assert losses["mrcnn_mask_loss"] == 0.0
    assert all(np.isfinite(v) for v in losses.values())
    assert all(np.all(np.isfinite(np.asarray(g))) for g in gradients.values() if g is not None)



def _inference_outputs(config, weights_from=None):
    model = build_inference_model(config)
    if weights_from is not None:
        for layer in [la for la in weights_from.layers if la.weights]:
            model.get_layer(layer.name).set_weights(layer.get_weights())
    images = np.stack([shapes.generate_sample(seed, 128, 128, 2, 3).image for seed in (5, 6)])
    molded, metas = mold_inputs(list(images), config)
    detections, _, _, masks, *_ = model.predict_on_batch([molded, metas])
    return model, np.asarray(detections), np.asarray(masks)


def test_inference_runs_the_mask_head_on_the_detections_found_with_static_masks():
    # A threshold between the random model's scores: some slots hold detections, some not.
    keras.utils.set_random_seed(0)
    config = Config.from_yaml("configs/demo.yaml", OVERRIDES + ["IMAGES_PER_GPU=2"])
    probe, probe_detections, _ = _inference_outputs(
        config.replace(MASK_HEAD_ROIS="static", DETECTION_MIN_CONFIDENCE=0.0))
    scores = probe_detections[..., 5][probe_detections[..., 4] > 0]
    threshold = float(np.median(scores))

    outputs = {}
    for rois in ("dynamic", "static"):
        model, detections, masks = _inference_outputs(
            config.replace(MASK_HEAD_ROIS=rois, DETECTION_MIN_CONFIDENCE=threshold),
            weights_from=probe)
        outputs[rois] = detections, masks
        layer_names = {layer.name for layer in model.layers}
        assert ("detected_rois" in layer_names) is (rois == "dynamic")
    detections, masks = outputs["dynamic"]
    np.testing.assert_array_equal(detections, outputs["static"][0])
    found = detections[..., 4] > 0
    assert 0 < found.sum() < found.size  # real detections and empty slots
    np.testing.assert_allclose(masks[found], outputs["static"][1][found], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(masks[~found], 0.5)  # sigmoid(0): the head did not run
