"""The training procedure (matterport's `train`, `compile`, `set_trainable`), for Keras 3.

    model.train(train_data, val_data, learning_rate=cfg.LEARNING_RATE, epochs=40, layers="heads")
    model.train(train_data, val_data, learning_rate=cfg.LEARNING_RATE / 10, epochs=120,
                layers="all")

`epochs` is the epoch to stop at: a model loaded from `..._0040.h5` continues at epoch 41.
Each train() call starts a new SGD optimizer for its trainable set (as matterport compiles
anew); a checkpoint written by the same stage restores its momentum and iteration count, so a
stopped stage resumes exactly.
"""

from __future__ import annotations

import ctypes
import functools
import math
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import keras
import tensorflow as tf

from trainer.data import input as data_input
from trainer.data.augment import Augmentation
from trainer.engine.strategy import is_chief
from trainer.errors import UserError
from trainer.weights.by_name import save_weights, weight_names
from trainer.weights.checkpoints import (
    checkpoint_path,
    create_run_folder,
    epoch_of,
    load_optimizer_state,
    optimizer_path,
    prune_checkpoints,
    remove_leftovers,
    save_optimizer_state,
)

# Matterport's predefined layer selections; anything else is a regular expression matched
# against whole layer names.
LAYER_REGEX = {
    "heads": r"(mrcnn\_.*)|(rpn\_.*)|(fpn\_.*)",
    "3+": r"(res3.*)|(bn3.*)|(res4.*)|(bn4.*)|(res5.*)|(bn5.*)|(mrcnn\_.*)|(rpn\_.*)|(fpn\_.*)",
    "4+": r"(res4.*)|(bn4.*)|(res5.*)|(bn5.*)|(mrcnn\_.*)|(rpn\_.*)|(fpn\_.*)",
    "5+": r"(res5.*)|(bn5.*)|(mrcnn\_.*)|(rpn\_.*)|(fpn\_.*)",
    "all": ".*",
}


# Batches averaged for precise BatchNorm statistics at each epoch end (TRAIN_BN only): about a
# second each on a CPU, negligible beside an epoch of real training.
PRECISE_BN_STEPS = 8


class TrainingDivergedError(UserError):
    """The loss became NaN or infinite; training stopped, the last good checkpoint is kept."""


def resolve_layers(layers: str) -> str:
    """A predefined selection's regex, or `layers` itself once checked to compile."""
    regex = LAYER_REGEX.get(layers, layers)
    try:
        re.compile(regex)
    except re.error as err:
        raise UserError(f"layers={layers!r} is neither one of {', '.join(LAYER_REGEX)} nor a "
                        f"valid regular expression ({err})") from None
    return regex


def set_trainable(keras_model: keras.Model, layer_regex: str, verbose: int = 1,
                  indent: int = 0) -> list[str]:
    """Makes the layers whose whole name matches `layer_regex` trainable, the rest frozen.

    Reaches into nested models (`rpn_model`: its layers are matched by their own names) and
    into wrapped layers (TimeDistributed: the wrapper's name decides, the inner layer holds
    the weights). Returns the names of the layers left trainable.
    """
    selected = []
    for layer in keras_model.layers:
        if isinstance(layer, keras.Model):
            if verbose:
                print(f"{' ' * indent}In model: {layer.name}")
            layer.trainable = True  # its own layers decide below
            selected += set_trainable(layer, layer_regex, verbose, indent + 4)
            continue
        if not layer.weights:
            continue
        trainable = re.fullmatch(layer_regex, layer.name) is not None
        layer.trainable = trainable
        if isinstance(layer, keras.layers.TimeDistributed):
            layer.layer.trainable = trainable
        if trainable:
            selected.append(layer.name)
            if verbose:
                print(f"{' ' * indent}{layer.name:20} ({type(layer).__name__})")
    return selected


def learning_rate_for(config, learning_rate: float = 0.0, factor: float = 1.0) -> float:
    """The one place that decides a stage's learning rate: `learning_rate` when positive;
    0 (the one marker for "the config's default") means LEARNING_RATE x `factor` (the
    pipeline's all-layers stage uses a tenth, as matterport's samples do)."""
    if learning_rate < 0 or factor <= 0:
        raise UserError(f"learning rate {learning_rate} x factor {factor}: the rate must be "
                        "positive, or 0 for the config's LEARNING_RATE")
    return learning_rate if learning_rate > 0 else config.LEARNING_RATE * factor


@keras.saving.register_keras_serializable(package="mrcnn")
class WarmupCosineSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """LEARNING_RATE with an optional linear warm-up and cosine decay, by global step.

    The global step is `start_step + optimizer.iterations` (start_step: the steps of earlier
    epochs, so a stage that continues a run continues its schedule). Warm-up multiplies the
    rate by (step + 1) / warmup_steps for the first warmup_steps steps; cosine decay multiplies
    it by 0.5 (1 + cos(pi step / decay_steps)), reaching 0 at decay_steps (0: no decay).
    """

    def __init__(self, learning_rate: float, warmup_steps: int = 0, decay_steps: int = 0,
                 start_step: int = 0):
        self.learning_rate = float(learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.decay_steps = int(decay_steps)
        self.start_step = int(start_step)

    def __call__(self, step):
        step = tf.cast(step, tf.float32) + float(self.start_step)
        rate = tf.constant(self.learning_rate)
        if self.warmup_steps:
            rate *= tf.minimum(1.0, (step + 1.0) / float(self.warmup_steps))
        if self.decay_steps:
            progress = tf.minimum(step / float(self.decay_steps), 1.0)
            rate *= 0.5 * (1.0 + tf.cos(math.pi * progress))
        return rate

    def get_config(self) -> dict:
        return {"learning_rate": self.learning_rate, "warmup_steps": self.warmup_steps,
                "decay_steps": self.decay_steps, "start_step": self.start_step}


class AllReducedClipping:
    """Optimizer mixin: gradients are summed over all replicas (and workers) BEFORE they are
    clipped by their global norm, so GPU_COUNT x WORKERS replicas take the step one device
    takes on the whole batch (matterport's meaning of GRADIENT_CLIP_NORM).

    Keras 3 (TF backend) clips each replica's share in `apply` and sums the shares only
    afterwards, in `_backend_update_step`: with two replicas each share was clipped to the
    norm, and their sum could reach twice it. Here `_clip_gradients` (called once per step,
    in the replica context, just before the update) does the one all-reduce itself and
    `_all_reduce_sum_gradients` passes the sums through instead of summing again.
    """

    def _clip_gradients(self, grads):
        context = tf.distribute.get_replica_context()
        if context is not None:  # None: cross-replica context, nothing to sum
            present = [g for g in grads if g is not None]
            summed = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, present)
                          if present else [])
            grads = [None if g is None else next(summed) for g in grads]
        if self.global_clipnorm and self.global_clipnorm > 0 and not self.clipnorm:
            return clip_by_global_norm(grads, self.global_clipnorm)
        return super()._clip_gradients(grads)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return list(grads_and_vars)  # summed in _clip_gradients already


def clip_by_global_norm(gradients: list, clip_norm: float) -> list:
    """`gradients` (None where a variable has none) times min(1, clip_norm / their global
    norm), as Keras's `clip_by_global_norm` (a NaN or infinite norm makes every gradient NaN),
    with each squared norm taken by `l2_loss` in one pass (Keras squares each gradient into a
    temporary first: one more copy of all gradients, 176 MB for ResNet-50, each step)."""
    present = [g for g in gradients if g is not None]
    if not present:
        return list(gradients)
    norm = tf.sqrt(2.0 * tf.add_n([tf.nn.l2_loss(tf.cast(g, tf.float32)) for g in present]))
    scale = clip_norm * tf.minimum(1.0 / norm, 1.0 / clip_norm) + (norm - norm)
    return [None if g is None else g * tf.cast(scale, g.dtype) for g in gradients]


@keras.saving.register_keras_serializable(package="mrcnn")
class SGD(AllReducedClipping, keras.optimizers.SGD):
    """Keras SGD; global-norm clipping of the gradient summed over replicas.

    The momentum update runs as one `ResourceApplyKerasMomentum` op per variable, in place
    (Keras 2's SGD did the same): Keras 3 spells it as four ops whose full-size temporaries
    (m x momentum, g x lr, their difference) live alongside the gradients at the step's
    memory peak (three 49 MB copies for the classifier's 7x7x256x1024 kernel alone). The
    arithmetic is Keras's: m = m * momentum - lr * g; w = w + m.
    """

    def update_step(self, gradient, variable, learning_rate):
        if self.momentum == 0 or self.nesterov or isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        accumulator = self.momentums[self._get_variable_index(variable)]
        dtype = variable.dtype
        return tf.raw_ops.ResourceApplyKerasMomentum(
            var=variable.handle, accum=accumulator.handle, lr=tf.cast(learning_rate, dtype),
            grad=tf.cast(gradient, dtype), momentum=tf.cast(self.momentum, dtype),
            use_locking=False, use_nesterov=False)


@keras.saving.register_keras_serializable(package="mrcnn")
class Adam(AllReducedClipping, keras.optimizers.Adam):
    """Keras Adam; global-norm clipping of the gradient summed over replicas."""


@keras.saving.register_keras_serializable(package="mrcnn")
class AdamW(AllReducedClipping, keras.optimizers.AdamW):
    """Keras AdamW; global-norm clipping of the gradient summed over replicas."""


def make_optimizer(learning_rate: float, config, start_step: int = 0,
                   end_step: int = 0) -> keras.optimizers.Optimizer:
    """`_unscaled_optimizer`, wrapped for MIXED_PRECISION=float16 in Keras' dynamic loss
    scaling (float16 gradients underflow without it; bfloat16 has float32's range and needs
    none). The wrapper unscales the gradients before the inner optimizer clips and applies them.
    """
    optimizer = _unscaled_optimizer(learning_rate, config, start_step, end_step)
    if config.MIXED_PRECISION == "float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _unscaled_optimizer(learning_rate: float, config, start_step: int = 0,
                        end_step: int = 0) -> keras.optimizers.Optimizer:
    """The config's OPTIMIZER with gradients clipped by their GLOBAL norm: Keras 2's
    `clipnorm` (matterport's GRADIENT_CLIP_NORM) clipped all gradients together; Keras 3's
    `clipnorm` clips each one separately, its `global_clipnorm` is the old meaning. The norm
    is that of the gradient summed over all replicas and workers (`AllReducedClipping`), as
    matterport's single device saw it.

    sgd (matterport's): momentum LEARNING_MOMENTUM. adam: Adam (beta_1 0.9), whose steps do not
    depend on the gradients' scale: from random initialisation the first convolution's
    gradient (un-normalised pixels before a BatchNorm) is thousands of times the heads', and
    clipping SGD by the global norm leaves the heads almost no step. adamw: Adam with
    WEIGHT_DECAY applied as decoupled decay (the model then adds no L2 term), BatchNorm and
    GroupNorm gamma/beta excluded as in matterport's L2.
    With LR_WARMUP_STEPS or LR_DECAY the rate follows `WarmupCosineSchedule` from global step
    `start_step`; cosine decay ends at `end_step` (the epoch this training stops at).
    """
    rate = learning_rate
    if config.LR_WARMUP_STEPS or config.LR_DECAY != "none":
        rate = WarmupCosineSchedule(
            learning_rate, config.LR_WARMUP_STEPS,
            end_step if config.LR_DECAY == "cosine" else 0, start_step)
    clip = config.GRADIENT_CLIP_NORM
    if config.OPTIMIZER == "adam":
        return Adam(learning_rate=rate, global_clipnorm=clip)
    if config.OPTIMIZER == "adamw":
        optimizer = AdamW(learning_rate=rate, weight_decay=config.WEIGHT_DECAY,
                          global_clipnorm=clip)
        optimizer.exclude_from_weight_decay(var_names=["gamma", "beta"])
        return optimizer
    return SGD(learning_rate=rate, momentum=config.LEARNING_MOMENTUM, global_clipnorm=clip)


def recompute_bn_statistics(keras_model: keras.Model, batches, steps: int = 1) -> int:
    """Precise BatchNorm (as Detectron2's PreciseBN): replaces the moving statistics of every
    BatchNorm layer that trains (TRAIN_BN true) with their average over `steps` batches.

    With TRAIN_BN, training normalises with each batch's statistics while inference uses
    moving averages (momentum 0.99) that lag behind weights that move fast; recomputing them
    once the weights are final makes inference see what training saw. Returns the number of
    BatchNorm layers updated.
    """
    norms = [layer for layer in _all_layers(keras_model)
             if isinstance(layer, keras.layers.BatchNormalization)
             and getattr(layer, "train_bn", True)]
    momentums = [layer.momentum for layer in norms]
    try:
        for k, batch in zip(range(steps), batches):
            for layer in norms:  # running average: the k-th batch weighs 1 / (k + 1)
                layer.momentum = k / (k + 1.0)
            keras_model(batch, training=True)  # eager: the momentum is read on each call
    finally:
        for layer, momentum in zip(norms, momentums, strict=True):
            layer.momentum = momentum
    return len(norms)


def _all_layers(model: keras.Model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
        elif isinstance(layer, keras.layers.TimeDistributed):
            yield layer.layer
        else:
            yield layer


# === Callbacks ===


class NonFiniteLossGuard(keras.callbacks.Callback):
    """Stops training at the first NaN/inf loss and remembers where it happened."""

    def __init__(self):
        super().__init__()
        self.tripped: tuple[int, int, float] | None = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)) and self.tripped is None:
            self.tripped = (self._epoch + 1, batch + 1, float(loss))
            self.model.stop_training = True


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (macOS, musl: no such call)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_heap() -> bool:
    """Hands the C heap's free pages back to the system (glibc's `malloc_trim(0)`); False where
    there is no glibc.

    Tracing and optimising a training step leaves ~100 MB of freed memory in the heap that
    glibc keeps; later steps do not need it back, but hold it resident. Released after the
    first step, the 256 px setting's steady-state RSS fell by ~90 MB and its peak (now the
    first step's) by 15-80 MB (bench/train_step.py, three A/B pairs).
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class ReleaseFreedHeap(keras.callbacks.Callback):
    """`release_freed_heap` after each fit's first step, once its graph is built, and after
    each validation (the first one traces the evaluation step)."""

    def __init__(self):
        super().__init__()
        self.releases = 0
        self._first = True

    def on_train_begin(self, logs=None):
        self._first = True

    def on_train_batch_end(self, batch, logs=None):
        if self._first:
            self._first = False
            self.releases += release_freed_heap()

    def on_test_end(self, logs=None):
        self.releases += release_freed_heap()


class PreciseBatchNorm(keras.callbacks.Callback):
    """At each epoch end, before the checkpoint is written: BatchNorm moving statistics
    recomputed on `steps` training batches with the epoch's final weights (TRAIN_BN only; see
    `recompute_bn_statistics`). Checkpoints then infer as they trained."""

    def __init__(self, batches, guard: NonFiniteLossGuard, steps: int = PRECISE_BN_STEPS):
        super().__init__()
        self.batches, self.guard, self.steps = batches, guard, steps

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.tripped is None:
            recompute_bn_statistics(self.model, self.batches, self.steps)


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch: the optimizer state, then the weights in matterport's h5 layout
    beside it, each written atomically (a weights file is never without its state). Never
    writes after the loss went non-finite. keep_last: older checkpoints of the folder are
    deleted, except `protected` ones (None: all kept, as matterport)."""

    def __init__(self, log_dir: Path, name: str, guard: NonFiniteLossGuard,
                 extra: dict | None = None, keep_last: int | None = None,
                 protected: Sequence[Path] = ()):
        super().__init__()
        self.log_dir, self.name, self.guard = Path(log_dir), name, guard
        self.extra = extra or {}
        self.keep_last, self.protected = keep_last, tuple(protected)
        self.last_saved: Path | None = None

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.tripped is not None:
            return
        path = checkpoint_path(self.log_dir, self.name, epoch + 1)
        variables = self.model.trainable_variables
        save_optimizer_state(optimizer_path(path), self.model.optimizer, variables,
                             weight_names(self.model, variables), self.extra)
        save_weights(self.model, path, extra_attrs={"epoch": epoch + 1})
        self.last_saved = path
        if self.keep_last is not None:
            prune_checkpoints(self.log_dir, self.name, self.keep_last, self.protected)


# === train ===


def _datasets(model, train_data, val_data, augmentation, no_augmentation_sources):
    """Batched tf.data for training and validation from prepared folders or datasets."""
    if augmentation is not None and type(augmentation).__module__.startswith("imgaug"):
        raise UserError("imgaug augmenters are not supported (imgaug breaks on NumPy 2): pass a "
                        "spec such as {sometimes: 0.5, then: [{fliplr: 0.5}]}")
    augment = None if augmentation is None else Augmentation.from_spec(augmentation)

    def one(data, training: bool):
        if isinstance(data, tf.data.Dataset):
            if augment is not None and training:
                raise UserError("augmentation applies to prepared dataset folders; a "
                                "tf.data.Dataset must be augmented by its producer")
            return data
        if training:
            return data_input.training_dataset(str(data), model.config, augmentation=augment,
                                               no_augmentation_sources=no_augmentation_sources)
        return data_input.evaluation_dataset(str(data), model.config, repeat=True)

    return one(train_data, True), (None if val_data is None else one(val_data, False))


def _per_replica(strategy, dataset: tf.data.Dataset, images_per_gpu: int):
    """With several workers: each worker's own pipeline (batches of its GPU_COUNT x
    IMAGES_PER_GPU images, shuffled independently of the other workers') split into
    per-replica batches; the global batch is then IMAGES_PER_GPU x GPU_COUNT x WORKERS."""
    return strategy.distribute_datasets_from_function(
        lambda context: dataset.rebatch(images_per_gpu, drop_remainder=True))


def fit_on_several_workers(keras_model: keras.Model) -> None:
    """Two work-arounds for Keras 3.15's `fit` under MultiWorkerMirroredStrategy, for a model
    and optimizer built before `fit` (as `train` builds them):
    - `fit` first averages one input batch over the replicas (`strategy.reduce` of the
      input structure) for a symbolic build, which this strategy cannot reduce (it fails
      converting a PerReplica): a built model needs no symbolic build, so it is skipped;
    - the step's logs are averaged with `strategy.reduce(MEAN, axis=0)`, which fails on the
      scalars a step returns: the steps here return each log as a [1] vector, whose mean is
      the scalar. Every replica's value is already the all-replica value (Keras metrics sum
      their variables across replicas), so the mean changes nothing."""
    if not (keras_model.built and keras_model.optimizer is not None
            and keras_model.optimizer.built):
        raise AssertionError("fit_on_several_workers needs a built model and optimizer")
    keras_model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    for name in ("train_step", "test_step"):
        step = getattr(keras_model, name)
        setattr(keras_model, name, lambda data, step=step: {
            key: tf.reshape(value, [1]) for key, value in step(data).items()})


def _writing_folder(model, chief: bool) -> Path:
    """Where this process writes checkpoints and TensorBoard logs (its `model.log_dir` from
    now on): the run folder for the chief (created for a new run, never a concurrent run's);
    for any other worker a scratch folder of the same name under $TMPDIR, which goes with the
    pod (TensorFlow's multi-worker rule: only the chief's files are the run's)."""
    if not chief:
        model.log_dir = Path(tempfile.mkdtemp(prefix="mrcnn-worker-")) / model.log_dir.name
    elif model.resume_from is None:
        model.log_dir = create_run_folder(model.model_dir, model.config.NAME)
    return model.log_dir


def train(model, train_data, val_data, learning_rate: float, epochs: int, layers: str,
          augmentation=None, custom_callbacks: Sequence[keras.callbacks.Callback] | None = None,
          no_augmentation_sources: Sequence[str] | None = None, verbose: int = 1,
          keep_last: int | None = None):
    """Trains `model` (a training-mode MaskRCNN) from `model.epoch` up to `epochs`.

    train_data / val_data: prepared dataset folders (`mrcnn data prepare`) or tf.data.Datasets
    of batched model inputs. keep_last: keep only the newest `keep_last` checkpoints of the
    run folder, plus the one a new stage started from (None: keep all, as matterport).
    Returns the Keras History (None when there is nothing to do). Raises
    TrainingDivergedError if the loss becomes non-finite.
    """
    if model.mode != "training":
        raise UserError("train() needs a model built with mode='training'")
    config = model.config
    if epochs <= model.epoch:
        print(f"Already at epoch {model.epoch}; epochs={epochs}: nothing to train.")
        return None
    regex = resolve_layers(layers)
    if config.VALIDATION_STEPS == 0:
        # No validation (Keras 3 would read 0 steps as "until the data ends": on a repeated
        # validation set, never).
        val_data = None
    train_set, val_set = _datasets(model, train_data, val_data, augmentation,
                                   no_augmentation_sources)
    if keep_last is not None and keep_last < 1:
        raise UserError(f"keep_last must be at least 1 (or None: keep all), got {keep_last}")
    chief = is_chief(config)
    log_dir = _writing_folder(model, chief)
    for leftover in remove_leftovers(log_dir, config.NAME):
        print(f"Removed {leftover.name}, left by an interrupted checkpoint write")
    per_worker_train = train_set
    if config.WORKERS > 1:
        train_set = _per_replica(model.strategy, train_set, config.IMAGES_PER_GPU)
        if val_set is not None:
            val_set = _per_replica(model.strategy, val_set, config.IMAGES_PER_GPU)
    print(f"\nStarting at epoch {model.epoch}. LR={learning_rate}\n")
    print(f"Checkpoint Path: {log_dir}/mask_rcnn_{config.NAME.lower()}_*epoch*.h5"
          + ("" if chief else " (scratch: a worker that is not the chief)"))
    print("Selecting layers to train")
    keras_model = model.keras_model
    with model.strategy.scope():
        set_trainable(keras_model, regex, verbose=verbose)
        optimizer = make_optimizer(learning_rate, config,
                                   start_step=model.epoch * config.STEPS_PER_EPOCH,
                                   end_step=epochs * config.STEPS_PER_EPOCH)
        # JIT_COMPILE: XLA for the train step (False: Keras' "auto" would pick XLA on a GPU).
        keras_model.compile(optimizer=optimizer, jit_compile=config.JIT_COMPILE)
        optimizer.build(keras_model.trainable_variables)
        variables = keras_model.trainable_variables
        restored = model.resume_from is not None and load_optimizer_state(
            optimizer_path(model.resume_from), optimizer, variables,
            weight_names(keras_model, variables))
        if restored:
            print(f"Restored optimizer state (iteration {int(optimizer.iterations.numpy())}) "
                  f"from {optimizer_path(model.resume_from)}")
    if config.WORKERS > 1:
        fit_on_several_workers(keras_model)
    schedule = getattr(optimizer, "inner_optimizer", optimizer)._learning_rate  # loss scaling
    if isinstance(schedule, WarmupCosineSchedule):
        # The restored iterations already count this stage's earlier epochs.
        schedule.start_step = (model.epoch * config.STEPS_PER_EPOCH
                               - int(optimizer.iterations.numpy()))
    else:
        optimizer.learning_rate.assign(learning_rate)

    guard = NonFiniteLossGuard()
    # A checkpoint whose optimizer state did not restore ended another stage: kept.
    stage_start = [model.resume_from] if model.resume_from is not None and not restored else []
    checkpoint = EpochCheckpoint(log_dir, config.NAME, guard,
                                 {"layers": regex, "learning_rate": learning_rate},
                                 keep_last=keep_last, protected=stage_start)
    uses_batch_statistics = config.TRAIN_BN and config.NORM == "batch"  # GroupNorm has none
    precise_bn = ([PreciseBatchNorm(iter(per_worker_train), guard)] if uses_batch_statistics
                  else [])
    callbacks = [guard, *precise_bn, checkpoint, ReleaseFreedHeap(),
                 keras.callbacks.TensorBoard(log_dir=str(log_dir), write_graph=False),
                 *(custom_callbacks or [])]
    warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")
    history = keras_model.fit(
        train_set, initial_epoch=model.epoch, epochs=epochs,
        steps_per_epoch=config.STEPS_PER_EPOCH, callbacks=callbacks,
        validation_data=val_set, validation_steps=config.VALIDATION_STEPS if val_set else None,
        verbose=verbose)
    if guard.tripped is not None:
        epoch, step, value = guard.tripped
        kept = checkpoint.last_saved or model.resume_from
        raise TrainingDivergedError(
            f"loss became {value} at epoch {epoch}, step {step}: training stopped; last good "
            f"checkpoint: {kept or 'none'}. Lower LEARNING_RATE or GRADIENT_CLIP_NORM, or check "
            "the data")
    if checkpoint.last_saved is not None:
        model.epoch = epoch_of(checkpoint.last_saved)
        model.resume_from = checkpoint.last_saved
    return history
