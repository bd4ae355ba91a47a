import numpy as np
import tensorflow as tf

from trainer.model.targets import detection_targets, rpn_targets

GT = [0.2, 0.2, 0.6, 0.6]
PROPOSALS = [
    GT,                        # IoU 1
    [0.2, 0.2, 0.6, 0.5],      # IoU 0.75
    [0.2, 0.2, 0.6, 0.42],     # IoU 0.55: positive
    [0.7, 0.7, 0.9, 0.9],      # IoU 0: negative
    [0.0, 0.0, 0.1, 0.1],      # IoU 0: negative
    [0.0, 0.0, 0.0, 0.0],      # padding: never sampled
]
STD = (0.1, 0.1, 0.2, 0.2)


def full_mask() -> np.ndarray:
    """11 x 11 image (so normalised 0.1 = 1 pixel): the object fills rows 2-6, columns 2-4,
    the left part of its box [0.2, 0.2, 0.6, 0.6] = pixels 2..6."""
    mask = np.zeros((1, 11, 11, 2), bool)
    mask[0, 2:7, 2:5, 0] = True
    return mask


def run(class_ids, masks, use_mini_mask=False, rois=8, ratio=0.5):
    boxes = np.zeros((1, 2, 4), np.float32)
    boxes[0, 0] = GT
    boxes[0, 1] = [0.65, 0.65, 0.95, 0.95]  # a crowd region when class_ids[1] < 0
    out = detection_targets(
        tf.constant([PROPOSALS], tf.float32), tf.constant([class_ids], tf.int32),
        tf.constant(boxes), tf.constant(masks), rois_per_image=rois, positive_ratio=ratio,
        bbox_std_dev=STD, mask_shape=(5, 5), use_mini_mask=use_mini_mask)
    return [t.numpy()[0] for t in out]


def key(box) -> tuple:
    return tuple(round(float(v), 4) for v in box)


def rows_of(rois, valid):
    return sorted(key(r) for r in rois[valid])


def test_positives_negatives_and_ratio():
    rois, class_ids, deltas, masks, valid = run([2, 0], full_mask())
    assert rois.shape == (8, 4) and masks.shape == (4, 5, 5)  # 4 positive slots of 8
    positive = valid[:4]
    assert rows_of(rois[:4], positive) == sorted(key(p) for p in PROPOSALS[:3])
    # matterport's ratio: int(3 / 0.5) - 3 = 3 negatives wanted, 2 available.
    assert rows_of(rois[4:], valid[4:]) == sorted(key(p) for p in PROPOSALS[3:5])
    # Class 2 in the valid positive slots, 0 in every other slot.
    np.testing.assert_array_equal(class_ids, np.concatenate([positive * 2, np.zeros(4)]))
    assert not valid[7] and np.all(rois[~valid] == 0)


def test_deltas_normalised_by_std():
    rois, _, deltas, _, valid = run([2, 0], full_mask())
    by_roi = {key(r): d for r, d in zip(rois[:4][valid[:4]], deltas[:4])}
    np.testing.assert_allclose(by_roi[key(PROPOSALS[0])], [0, 0, 0, 0], atol=1e-6)
    # ROI [0.2, 0.2, 0.6, 0.5]: centre x 0.35 -> 0.4 over width 0.3; width 0.3 -> 0.4
    np.testing.assert_allclose(by_roi[(0.2, 0.2, 0.6, 0.5)],
                               [0, 0.05 / 0.3 / 0.1, 0, np.log(0.4 / 0.3) / 0.2], rtol=1e-4,
                               atol=1e-5)
    assert np.all(deltas[4:] == 0)


def check_masks(use_mini_mask):
    masks_in = full_mask()
    if use_mini_mask:
        mini = np.zeros((1, 5, 5, 2), bool)  # the gt box (pixels 2..6) sampled at 5 x 5
        mini[0, :, :3, 0] = True
        masks_in = mini
    rois, _, _, masks, valid = run([2, 0], masks_in, use_mini_mask=use_mini_mask)
    by_roi = {key(r): m for r, m in zip(rois[:4][valid[:4]], masks)}
    # The gt box itself: the left three of five columns.
    np.testing.assert_array_equal(by_roi[key(GT)], [[1, 1, 1, 0, 0]] * 5)
    # The ROI over the object's part of the box (columns 2 to 4.2): all object; its last
    # samples interpolate 0.8 of the way to a background column, which rounds to object.
    np.testing.assert_array_equal(by_roi[(0.2, 0.2, 0.6, 0.42)], np.ones((5, 5)))


def test_mask_targets_are_cropped_to_the_roi():
    check_masks(use_mini_mask=False)


def test_mask_targets_from_mini_masks():
    check_masks(use_mini_mask=True)


def test_crowd_regions_are_never_negatives_or_targets():
    rois, class_ids, _, _, valid = run([2, -2], full_mask())
    assert rows_of(rois[4:], valid[4:]) == [key(PROPOSALS[4])]  # [0.7..0.9] touches the crowd
    assert set(class_ids.tolist()) == {0, 2}


def test_no_objects_gives_empty_targets():
    rois, class_ids, deltas, masks, valid = run([0, 0], full_mask())
    assert not valid.any() and not class_ids.any() and not rois.any() and not masks.any()
    assert np.all(np.isfinite(deltas))


def numpy_rpn_targets(anchors, class_ids, boxes, per_image, std):
    """matterport's build_rpn_targets, written out for the case where nothing is subsampled."""
    def iou(a, b):
        y1 = np.maximum(a[:, None, 0], b[None, :, 0])
        x1 = np.maximum(a[:, None, 1], b[None, :, 1])
        y2 = np.minimum(a[:, None, 2], b[None, :, 2])
        x2 = np.minimum(a[:, None, 3], b[None, :, 3])
        inter = np.clip(y2 - y1, 0, None) * np.clip(x2 - x1, 0, None)
        area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
        return inter / (area(a)[:, None] + area(b)[None, :] - inter)

    objects = boxes[class_ids > 0]
    overlaps = iou(anchors, objects)
    best = overlaps.argmax(axis=1)
    best_iou = overlaps.max(axis=1)
    match = np.zeros(len(anchors), np.int32)
    match[best_iou < 0.3] = -1
    match[np.argwhere(overlaps == overlaps.max(axis=0))[:, 0]] = 1
    match[best_iou >= 0.7] = 1
    deltas = np.zeros((per_image, 4))
    for k, i in enumerate(np.flatnonzero(match == 1)):
        a, g = anchors[i], objects[best[i]]
        ah, aw, gh, gw = a[2] - a[0], a[3] - a[1], g[2] - g[0], g[3] - g[1]
        deltas[k] = [((g[0] + g[2]) - (a[0] + a[2])) / 2 / ah,
                     ((g[1] + g[3]) - (a[1] + a[3])) / 2 / aw, np.log(gh / ah), np.log(gw / aw)]
    return match, deltas / std


def test_rpn_targets_equal_numpy_reference():
    rng = np.random.default_rng(3)
    corners = rng.uniform(0, 48, (40, 2))
    anchors = np.concatenate([corners, corners + rng.uniform(8, 24, (40, 2))], 1)
    anchors = np.concatenate([anchors, [[10, 10, 30, 30], [11, 10, 31, 30]]]).astype(np.float32)
    boxes = np.array([[10, 10, 30, 30], [40, 5, 60, 20], [0, 0, 0, 0]], np.float32)
    class_ids = np.array([1, 3, 0], np.int32)
    per_image = 2 * len(anchors)  # room for everything: nothing is subsampled
    match, deltas = rpn_targets(tf.constant(anchors), tf.constant(class_ids), tf.constant(boxes),
                                per_image, STD)
    expected_match, expected_deltas = numpy_rpn_targets(anchors, class_ids, boxes, per_image,
                                                        np.array(STD))
    np.testing.assert_array_equal(match.numpy(), expected_match)
    np.testing.assert_allclose(deltas.numpy(), expected_deltas, rtol=1e-4, atol=1e-5)
    assert (expected_match == 1).sum() >= 3 and (expected_match == -1).sum() > 10


def test_rpn_targets_subsample_to_budget():
    anchors = np.array([[0, 0, 10, 10]] * 30 + [[50, 50, 60, 60]] * 30, np.float32)
    boxes = np.array([[0, 0, 10, 10]], np.float32)
    match, deltas = rpn_targets(tf.constant(anchors), tf.constant([1]), tf.constant(boxes), 16, STD)
    match = match.numpy()
    # 30 perfect positives capped at half the budget; negatives fill the other half.
    assert (match == 1).sum() == 8 and (match == -1).sum() == 8
    assert deltas.shape == (16, 4)
    np.testing.assert_allclose(deltas.numpy(), 0.0, atol=1e-6)


def test_rpn_targets_crowds_and_no_objects():
    anchors = np.array([[0, 0, 10, 10], [50, 50, 60, 60], [100, 100, 110, 110]], np.float32)
    boxes = np.array([[48, 48, 62, 62], [0, 0, 0, 0]], np.float32)
    match, _ = rpn_targets(tf.constant(anchors), tf.constant([-1, 0]), tf.constant(boxes), 4, STD)
    # Only a crowd region: no positives, and the anchor on the crowd is not a negative.
    np.testing.assert_array_equal(match.numpy(), [-1, 0, -1])


def test_include_gt_adds_the_objects_boxes_to_the_proposals():
    far = [[0.7, 0.7, 0.9, 0.9], [0.0, 0.0, 0.1, 0.1]]  # no proposal near the object
    boxes = np.array([[GT, [0.65, 0.65, 0.95, 0.95], [0, 0, 0, 0]]], np.float32)
    masks = np.zeros((1, 11, 11, 3), bool)
    args = (tf.constant([far], tf.float32), tf.constant([[1, -1, 0]], tf.int32),
            tf.constant(boxes), tf.constant(masks))
    options = dict(rois_per_image=8, positive_ratio=0.5, bbox_std_dev=STD, mask_shape=(5, 5),
                   use_mini_mask=False)
    _, class_ids, *_ = detection_targets(*args, **options)
    assert int(tf.reduce_sum(tf.cast(class_ids > 0, tf.int32))) == 0  # matterport: none
    rois, class_ids, deltas, _, valid = detection_targets(*args, **options, include_gt=True)
    # The object's own box is the one positive (the crowd region and padding are not added).
    assert class_ids.numpy()[0].tolist()[:1] == [1] and int((class_ids.numpy() > 0).sum()) == 1
    np.testing.assert_allclose(rois.numpy()[0, 0], GT)
    np.testing.assert_allclose(deltas.numpy()[0, 0], 0.0, atol=1e-6)
