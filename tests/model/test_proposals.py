"""The proposals' NMS, both variants: the padded one (XLA-compilable) and the per-image
kernel one select what TensorFlow's NMS kernel selects."""

import numpy as np
import pytest
import tensorflow as tf

from trainer.model.proposals import ProposalLayer, nms_kernel, nms_padded


def kernel_nms(boxes: np.ndarray, scores: np.ndarray, max_output: int, threshold: float):
    """The reference: NonMaxSuppressionV3 (what the proposal layer ran before), per image."""
    out = np.zeros((len(boxes), max_output, 4), np.float32)
    for i, (image_boxes, image_scores) in enumerate(zip(boxes, scores, strict=True)):
        keep = tf.image.non_max_suppression(image_boxes, image_scores, max_output, threshold)
        out[i, : len(keep)] = image_boxes[keep.numpy()]
    return out


def proposal_like_boxes(seed: int, images: int, count: int):
    """Clusters of overlapping boxes, clipped to the unit square as proposals are (some with
    zero height or width at the borders), with scores sorted descending."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-0.1, 1.1, (images, count // 8, 1, 2)).repeat(8, axis=2)
    centres = centres.reshape(images, -1, 2) + rng.normal(0, 0.02, (images, count, 2))
    sizes = rng.uniform(0.02, 0.4, (images, count, 2))
    boxes = np.clip(np.concatenate([centres - sizes / 2, centres + sizes / 2], -1), 0, 1)
    scores = -np.sort(-rng.uniform(0, 1, (images, count)), axis=1)
    return boxes.astype(np.float32), scores.astype(np.float32)


@pytest.mark.parametrize("threshold, max_output", [(0.7, 200), (0.3, 1000)])
def test_selections_equal_the_kernel_nms_with_and_without_xla(threshold, max_output):
    boxes, scores = proposal_like_boxes(seed=int(threshold * 10), images=2, count=1000)
    assert np.any((boxes[..., 2] == boxes[..., 0]) | (boxes[..., 3] == boxes[..., 1]))
    expected = kernel_nms(boxes, scores, max_output, threshold)
    assert not np.array_equal(expected, boxes[:, :max_output])  # NMS suppressed some boxes
    graph = nms_padded(tf.constant(boxes), tf.constant(scores), max_output, threshold)
    np.testing.assert_array_equal(graph.numpy(), expected)
    kernels = tf.function(lambda b, s: nms_kernel(b, s, max_output, threshold))
    np.testing.assert_array_equal(kernels(boxes, scores).numpy(), expected)
    # A batch size known when traced runs one kernel per image; an unknown one, a loop.
    looped = tf.function(lambda b, s: nms_kernel(b, s, max_output, threshold),
                         input_signature=[tf.TensorSpec([None, None, 4]),
                                          tf.TensorSpec([None, None])])
    np.testing.assert_array_equal(looped(boxes, scores).numpy(), expected)
    compiled = tf.function(
        lambda b, s: nms_padded(b, s, max_output, threshold), jit_compile=True)
    np.testing.assert_array_equal(compiled(boxes, scores).numpy(), expected)


@pytest.mark.parametrize("nms", [nms_padded, nms_kernel])
def test_fewer_boxes_than_outputs_are_zero_padded(nms):
    boxes = tf.constant([[[0.1, 0.1, 0.3, 0.3], [0.11, 0.1, 0.31, 0.3], [0.5, 0.5, 0.9, 0.9]]])
    kept = nms(boxes, tf.constant([[0.9, 0.8, 0.7]]), max_output=5, iou_threshold=0.5)
    np.testing.assert_allclose(kept.numpy()[0], [[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.9],
                                                 [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize("nms", [nms_padded, nms_kernel])
def test_an_all_zero_box_is_never_kept(nms):
    # The one difference from the bare kernel, which keeps it: a proposal clipped to the
    # image's top-left corner, a zero box, which targets and ROI pooling treat as padding.
    boxes = tf.constant([[[0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.9, 0.9]]])
    kept = nms(boxes, tf.constant([[0.9, 0.8]]), max_output=2, iou_threshold=0.5)
    np.testing.assert_allclose(kept.numpy()[0], [[0.5, 0.5, 0.9, 0.9], [0, 0, 0, 0]])


def test_proposal_layers_select_the_same_boxes_with_either_nms():
    rng = np.random.default_rng(3)
    anchors, _ = proposal_like_boxes(seed=4, images=1, count=600)
    probs = rng.uniform(0, 1, (2, 600)).astype(np.float32)
    inputs = [tf.constant(np.stack([1 - probs, probs], -1)),
              tf.constant(rng.normal(0, 1, (2, 600, 4)).astype(np.float32)),
              tf.constant(anchors[0])]
    padded = ProposalLayer(100, 0.7, 400, nms="padded")(inputs)
    kernel = ProposalLayer(100, 0.7, 400, nms="kernel")(inputs)
    assert np.count_nonzero(padded.numpy().any(-1)) > 100  # both images kept boxes
    np.testing.assert_array_equal(kernel.numpy(), padded.numpy())
    assert ProposalLayer.from_config(ProposalLayer(10, 0.7, 20, nms="kernel").get_config()).nms \
        == "kernel"
    with pytest.raises(ValueError, match="nms must be one of"):
        ProposalLayer(10, 0.7, 20, nms="fast")
