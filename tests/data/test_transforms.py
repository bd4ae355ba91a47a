import dataclasses

import numpy as np
import tensorflow as tf

from trainer.config import Config
from trainer.data.transforms import apply_geometry, boxes_from_masks, resize_geometry


def test_crop_mode_takes_a_random_min_dim_square_inside_the_image():
    config = Config(IMAGE_RESIZE_MODE="crop", IMAGE_MIN_DIM=64)
    image = tf.constant(np.arange(80 * 100, dtype=np.int32).reshape(80, 100, 1) % 251, tf.uint8)
    offsets = set()
    for _ in range(20):
        geometry = resize_geometry(80, 100, config)
        y, x = (int(v) for v in geometry["crop"])
        assert 0 <= y <= 80 - 64 and 0 <= x <= 100 - 64  # never outside: scale 1, no padding
        assert geometry["window"].numpy().tolist() == [0, 0, 64, 64]
        cropped = apply_geometry(image, geometry).numpy()
        np.testing.assert_array_equal(cropped, image.numpy()[y:y + 64, x:x + 64])
        offsets.add((y, x))
    assert len(offsets) > 1  # random, not a fixed corner


def test_square_mode_centres_the_scaled_image():
    config = Config(IMAGE_MIN_DIM=64, IMAGE_MAX_DIM=128)
    geometry = resize_geometry(32, 64, config)  # scaled by 2 to 64 x 128, padded 32 above/below
    assert float(geometry["scale"]) == 2.0
    assert geometry["window"].numpy().tolist() == [32, 0, 96, 128]
    masks = np.zeros((32, 64, 1), np.uint8)
    masks[4:8, 10:20] = 1
    resized = apply_geometry(tf.constant(masks), geometry, method="nearest").numpy() > 0
    np.testing.assert_array_equal(boxes_from_masks(tf.constant(resized)).numpy(),
                                  [[32 + 8, 20, 32 + 16, 40]])


def test_rpn_targets_come_from_every_object_before_the_max_gt_subsample():
    from trainer.data.transforms import training_example
    from trainer.model.anchors import anchors_for_image
    from trainer.model.box_ops import box_iou

    config = Config.from_yaml("configs/demo.yaml", ["MAX_GT_INSTANCES=1",
                                                    "RPN_TRAIN_ANCHORS_PER_IMAGE=256"])
    masks = np.zeros((128, 128, 3), bool)
    masks[10:40, 10:40, 0] = masks[10:40, 80:110, 1] = masks[80:110, 40:70, 2] = True
    anchors = tf.constant(anchors_for_image(config, config.IMAGE_SHAPE))
    out = training_example(tf.zeros((128, 128, 3), tf.uint8), tf.constant(masks),
                           tf.constant([1, 2, 3]), config, anchors)
    assert int(tf.reduce_sum(tf.cast(out["input_gt_class_ids"] > 0, tf.int32))) == 1
    positive = tf.boolean_mask(anchors, out["input_rpn_match"] == 1)
    gt = tf.constant([[10, 10, 40, 40], [10, 80, 40, 110], [80, 40, 110, 70]], tf.float32)
    # Each of the three objects has positive anchors (at least its best-matching ones: IoU
    # 0.43 for the first with these anchors), not only the one object the heads keep.
    assert np.all(tf.reduce_max(box_iou(gt, positive), axis=1).numpy() >= 0.4)


def test_images_left_without_objects_are_skipped():
    from trainer.data import shapes
    from trainer.data.memory import examples_dataset

    config = Config.from_yaml("configs/demo.yaml", ["IMAGES_PER_GPU=1"])
    full = shapes.generate_sample(2, 128, 128, min_instances=2, max_instances=2)
    # Only crowd regions (negative ids): no object to find once they are set aside.
    crowd = dataclasses.replace(shapes.generate_sample(1, 128, 128, 2, 2),
                                class_ids=-np.array([1, 2], np.int32))
    batches = examples_dataset([crowd, full, crowd], config, shuffle=False, repeat=False)
    ids = [batch["input_gt_class_ids"].numpy()[0] for batch in batches]
    assert len(ids) == 1 and (ids[0] > 0).sum() == 2


def test_a_dataset_is_one_source_so_every_class_is_active():
    # Kept on purpose (README, "What differs"): matterport's active_class_ids served datasets
    # merged from several sources; ours are one source each, so every class is active and the
    # class loss leaves no ROI out.
    from trainer.data.transforms import training_example
    from trainer.model.anchors import anchors_for_image
    from trainer.model.image_meta import parse_image_meta
    from trainer.model.losses import mrcnn_class_loss

    config = Config.from_yaml("configs/demo.yaml")
    masks = np.zeros((128, 128, 1), bool)
    masks[10:40, 10:40, 0] = True
    out = training_example(tf.zeros((128, 128, 3), tf.uint8), tf.constant(masks),
                           tf.constant([2]), config,
                           tf.constant(anchors_for_image(config, config.IMAGE_SHAPE)))
    active = parse_image_meta(out["input_image_meta"])["active_class_ids"]
    np.testing.assert_array_equal(active.numpy(), np.ones(config.NUM_CLASSES))
    logits = tf.constant([[[0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]]])
    loss = mrcnn_class_loss(tf.constant([[2, 0]]), logits, active[None], tf.constant([[1, 1]]))
    plain = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.constant([[2, 0]]), logits)
    np.testing.assert_allclose(float(loss), float(tf.reduce_mean(plain)), rtol=1e-6)
