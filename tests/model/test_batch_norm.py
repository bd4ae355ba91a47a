"""BatchNorm semantics: frozen layers keep TRAIN_BN's batch statistics (matterport's Keras 2),
and the mask head's statistics come from real ROIs only."""

import keras
import numpy as np
import tensorflow as tf

from trainer.model.batch_norm import BatchNorm, RoiBatchNorm


def test_a_layer_frozen_by_layers_still_normalises_with_batch_statistics():
    norm = BatchNorm(train_bn=True)
    x = np.array([[1.0], [3.0]], np.float32)  # mean 2, variance 1
    norm(x)  # build
    norm.trainable = False  # what train(layers="heads") does to the backbone
    out = norm(x, training=True).numpy()
    # Batch statistics (Keras 3 alone would use the initial moving mean 0, variance 1: x).
    np.testing.assert_allclose(out[:, 0], [-1.0, 1.0], atol=1e-3)
    # The moving statistics follow (momentum 0.99), gamma and beta do not move.
    np.testing.assert_allclose(norm.moving_mean.numpy(), [0.02], rtol=1e-5)
    np.testing.assert_allclose(norm.moving_variance.numpy(), [0.99 + 0.01 * 1.0], rtol=1e-5)
    assert norm.gamma.numpy()[0] == 1.0 and not norm.trainable_weights
    # Inference and TRAIN_BN false use the moving statistics.
    np.testing.assert_allclose(norm(x, training=False).numpy()[:, 0],
                               (x[:, 0] - 0.02) / np.sqrt(1.0 + 1e-3), rtol=1e-4)
    frozen_stats = BatchNorm(train_bn=False)
    np.testing.assert_allclose(frozen_stats(x, training=True).numpy(), x / np.sqrt(1.001),
                               rtol=1e-5)


def test_roi_batch_norm_takes_statistics_from_valid_rois_only():
    # Two images, three ROI slots of 1x1 pixel, one channel; only 3 slots hold real ROIs.
    x = np.zeros((2, 3, 1, 1, 1), np.float32)
    x[0, 0], x[0, 1], x[1, 0] = 1.0, 3.0, 2.0  # real ROIs: mean 2, variance 2/3
    x[1, 2] = 100.0                              # padding that happens to be non-zero
    valid = np.array([[True, True, False], [True, False, False]])
    norm = RoiBatchNorm(train_bn=True)
    out = norm([x, valid], training=True).numpy()
    expected = (np.array([1.0, 3.0, 2.0]) - 2.0) / np.sqrt(2.0 / 3.0 + 1e-3)
    np.testing.assert_allclose([out[0, 0, 0, 0, 0], out[0, 1, 0, 0, 0], out[1, 0, 0, 0, 0]],
                               expected, rtol=1e-4)
    np.testing.assert_allclose(norm.moving_mean.numpy(), [0.01 * 2.0], rtol=1e-5)
    # Same weights, same names as matterport's BatchNormalization.
    assert [w.name for w in norm.weights] == ["gamma", "beta", "moving_mean", "moving_variance"]


def test_roi_batch_norm_without_any_roi_keeps_its_statistics_and_finite_gradients():
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 3, 2, 2, 4)), tf.float32)
    norm = RoiBatchNorm(train_bn=True)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = norm([x, tf.zeros((2, 3), tf.bool)], training=True)
    assert np.all(np.isfinite(tape.gradient(out, x).numpy()))
    np.testing.assert_array_equal(norm.moving_mean.numpy(), np.zeros(4))
    np.testing.assert_array_equal(norm.moving_variance.numpy(), np.ones(4))


def _roi_norm_step(norm, x, valid):
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = norm([x, valid], training=True)
        loss = tf.reduce_sum(out * tf.sin(out))
    grads = tape.gradient(loss, [x, *norm.trainable_weights])
    return [out, *grads, norm.moving_mean, norm.moving_variance]


def test_roi_batch_norm_on_real_rois_only_is_fused_with_the_weighted_paths_numbers():
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(2.0, 3.0, size=(1, 5, 4, 4, 6)), tf.float32)
    valid = tf.ones((1, 5), tf.bool)
    fused, weighted = RoiBatchNorm(train_bn=True, padded=False), RoiBatchNorm(train_bn=True)
    for norm in (fused, weighted):
        norm.build([tuple(x.shape), (1, 5)])
        norm.gamma.assign(rng.uniform(0.5, 1.5, size=6))
    weighted.gamma.assign(fused.gamma)
    for got, want in zip(_roi_norm_step(fused, x, valid), _roi_norm_step(weighted, x, valid),
                         strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4,
                                   atol=1e-4 * np.abs(np.asarray(want)).max())
    graph = tf.function(lambda v, m: fused([v, m], training=True)).get_concrete_function(
        x, valid).graph
    kinds = {op.type for op in graph.get_operations()}
    assert "FusedBatchNormV3" in kinds and "Rsqrt" not in kinds, sorted(kinds)


def test_roi_batch_norm_on_real_rois_only_keeps_its_statistics_when_none_was_found():
    x = tf.constant(np.random.default_rng(4).normal(size=(1, 1, 3, 3, 4)), tf.float32)
    norm = RoiBatchNorm(train_bn=True, padded=False)
    out, grad_x, *_, mean, variance = _roi_norm_step(norm, x, tf.zeros((1, 1), tf.bool))
    assert np.all(np.isfinite(out.numpy())) and np.all(np.isfinite(grad_x.numpy()))
    np.testing.assert_array_equal(mean.numpy(), np.zeros(4))
    np.testing.assert_array_equal(variance.numpy(), np.ones(4))
    assert RoiBatchNorm.from_config(norm.get_config()).padded is False


def test_the_training_graph_feeds_the_mask_head_norms_the_positive_slots_validity():
    from trainer import Config, MaskRCNN

    config = Config.from_yaml("configs/demo.yaml", ["FPN_CLASSIF_FC_LAYERS_SIZE=64",
                                                    "TOP_DOWN_PYRAMID_SIZE=32", "NORM=batch"])
    for rois, validity in (("dynamic", lambda m: m.get_layer("positive_rois").output[2]),
                           ("static", lambda m: m.get_layer("positive_valid").output)):
        model = MaskRCNN("training", config.replace(MASK_HEAD_ROIS=rois)).keras_model
        for i in range(1, 5):
            layer = model.get_layer(f"mrcnn_mask_bn{i}")
            assert isinstance(layer, RoiBatchNorm)
            assert layer.padded == (rois == "static")  # dynamic: real ROIs only, fused
            x, valid = layer._inbound_nodes[0].input_tensors
            assert valid is validity(model)
    grouped = MaskRCNN("training", config.replace(NORM="group")).keras_model
    assert isinstance(grouped.get_layer("mrcnn_mask_bn1").layer, keras.layers.GroupNormalization)


def _train_once(layer, x, gamma, beta, trainable=True):
    """One training-mode call of `layer`: outputs, gradients, moving statistics."""
    layer.build(x.shape)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    layer.trainable = trainable
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * tf.sin(y))  # a gradient that differs per element
    grads = tape.gradient(loss, [x, *layer.trainable_weights])
    return [y, *grads, layer.moving_mean, layer.moving_variance]


def test_batch_statistics_run_as_one_fused_op_with_keras_numbers():
    rng = np.random.default_rng(1)
    for shape in [(2, 16, 16, 8), (3, 5, 7, 7, 4), (6, 4)]:  # backbone, TimeDistributed, FC
        x = tf.constant(rng.normal(1.0, 3.0, size=shape), tf.float32)
        gamma = rng.uniform(0.5, 1.5, size=shape[-1]).astype(np.float32)
        beta = np.full(shape[-1], 0.3, np.float32)
        for trainable in (True, False):  # False: a layer frozen by train(layers=...)
            ours = _train_once(BatchNorm(train_bn=True), x, gamma, beta, trainable)
            expected = _train_once(keras.layers.BatchNormalization(), x, gamma, beta)
            if not trainable:  # no gradients for frozen gamma and beta
                expected = [expected[0], expected[1], *expected[4:]]
            assert len(ours) == len(expected)
            for got, want in zip(ours, expected):
                np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                                           rtol=1e-4, atol=1e-3 * np.abs(want).max())

    norm = BatchNorm(train_bn=True)
    norm.build((2, 8, 8, 4))
    graph = tf.function(lambda v: norm(v, training=True)).get_concrete_function(
        tf.TensorSpec((2, 8, 8, 4), tf.float32)).graph
    kinds = {op.type for op in graph.get_operations()}
    assert "FusedBatchNormV3" in kinds and "Rsqrt" not in kinds, sorted(kinds)


def test_fused_batch_statistics_of_a_single_element_update_the_moving_variance_finitely():
    norm = BatchNorm(train_bn=True)
    out = norm(np.array([[5.0]], np.float32), training=True)
    assert np.all(np.isfinite(out.numpy()))
    np.testing.assert_allclose(norm.moving_variance.numpy(), [0.99], rtol=1e-6)
    np.testing.assert_allclose(norm.moving_mean.numpy(), [0.05], rtol=1e-5)
