"""examples_dataset: samples of any sizes in, the same examples `training_example` makes out,
and glibc's malloc left as it was (no `Dataset.from_generator`, see trainer/data/memory.py)."""

import subprocess
import sys
import textwrap

import numpy as np
import tensorflow as tf

from trainer.config import Config
from trainer.data import shapes
from trainer.data.memory import examples_dataset
from trainer.data.transforms import training_example
from trainer.model.anchors import anchors_for_image


def test_examples_are_training_example_s_for_samples_of_any_size():
    config = Config.from_yaml("configs/demo.yaml", ["IMAGES_PER_GPU=1"])
    samples = [shapes.generate_sample(1, 96, 128, min_instances=1, max_instances=1),
               shapes.generate_sample(2, 128, 80, min_instances=3, max_instances=3)]
    anchors = tf.constant(anchors_for_image(config, config.IMAGE_SHAPE))
    batches = list(examples_dataset(samples, config, shuffle=False, repeat=False))
    assert len(batches) == 2
    for i, (sample, batch) in enumerate(zip(samples, batches, strict=True)):
        expected = training_example(tf.constant(sample.image), tf.constant(sample.masks),
                                    tf.constant(sample.class_ids), config, anchors, image_id=i)
        assert batch.keys() == expected.keys()
        got = {key: value.numpy()[0] for key, value in batch.items()}
        want = {key: value.numpy() for key, value in expected.items()}
        for example in (got, want):
            # Instances come in a random order and negative anchors are sampled at random.
            order = np.lexsort(example["input_gt_boxes"].T)
            example["input_gt_boxes"] = example["input_gt_boxes"][order]
            example["input_gt_class_ids"] = example["input_gt_class_ids"][order]
            example["input_gt_masks"] = example["input_gt_masks"][..., order]
            example["input_rpn_match"] = example["input_rpn_match"] == 1
            example.pop("input_rpn_bbox")  # its rows follow the positives' sampled order
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


_FAULTS_AFTER = textwrap.dedent("""
    import ctypes, resource, sys
    import trainer, tensorflow as tf
    from trainer.config import Config
    from trainer.data import shapes
    from trainer.data.memory import examples_dataset
    if sys.argv[1] == "generator":
        tf.data.Dataset.from_generator(lambda: iter([1]), output_signature=tf.TensorSpec(
            [], tf.int32)).get_single_element()
    else:
        config = Config.from_yaml("configs/demo.yaml", ["IMAGES_PER_GPU=1"])
        next(iter(examples_dataset(list(shapes.generate(2, seed=0)), config)))
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(100):  # an 8 MB buffer made, written and freed, as a kernel's scratch is
        block = libc.malloc(1 << 23)
        libc.memset(block, 1, 1 << 23)
        libc.free(block)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _page_faults_of_scratch_buffers_after(dataset: str) -> int:
    run = subprocess.run([sys.executable, "-c", _FAULTS_AFTER, dataset], capture_output=True,
                         text=True, check=True)
    return int(run.stdout.split()[-1])


def test_the_dataset_leaves_malloc_reusing_its_heap():
    # After a generator dataset each 8 MB malloc is a new mapping, 2,048 page faults each time
    # (measured: 204,900 for the 100); otherwise glibc reuses the first one's pages (~4,000).
    # The first is what this test would see if examples_dataset went back to from_generator.
    assert _page_faults_of_scratch_buffers_after("generator") > 100 * 1000
    assert _page_faults_of_scratch_buffers_after("examples") < 100 * 200
