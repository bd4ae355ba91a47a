"""Time to accuracy: trains a preset on generated shapes from random initialisation and
evaluates it at fixed training wall-clock checkpoints.

    python bench/convergence.py --config configs/demo.yaml --at 60 120 240 --out runs/curve
    python bench/convergence.py --config configs/demo.yaml --set LEARNING_RATE=0.002 \
        --train-images 1000 --val-images 200 --at 300 600 --lr-drop-at 500

Prints one JSON line per evaluation: training seconds (steps only, not data preparation,
model building or evaluation; the first step's graph tracing, ~15 s, counts), steps, images
seen, the COCO and VOC metrics of `trainer.evaluation.run.evaluate` on the val split (>= 100
images), and the mean training losses since the previous line. Writes `curve.png` (mAP
against training time) and `curve.jsonl` into --out. Training is one continuous run at the
config's LEARNING_RATE (its warm-up and decay included; cosine decay ends at --max-steps),
optionally divided by 10 at --lr-drop-at seconds (as the pipeline's train-all stage);
BatchNorm moving statistics are recomputed before each evaluation when they are used
(TRAIN_BN with NORM=batch).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import trainer  # noqa: E402, F401  (before TensorFlow: its start-up turns oneDNN on)

METRICS = ("bbox_mAP", "bbox_mAP50", "segm_mAP", "segm_mAP50", "voc_mAP50")


def prepare(out: Path, train_images: int, val_images: int, image_size: int, seed: int) -> Path:
    """A shapes dataset whose val split has about `val_images` images (split by hash)."""
    from trainer.data.prepare import prepare_dataset

    data = out / "data"
    if not (data / "dataset.json").is_file():
        total = train_images + val_images
        prepare_dataset("shapes", data, count=total, image_size=image_size,
                        val_fraction=val_images / total, shards=4, seed=seed, progress=False)
    return data


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    seconds = [row["seconds"] for row in rows]
    for key in METRICS:
        axes.plot(seconds, [row[key] or 0.0 for row in rows], marker="o", label=key)
    axes.set_xlabel("training wall-clock seconds (2 CPU cores)")
    axes.set_ylabel("mAP")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE")
    parser.add_argument("--at", type=float, nargs="+", default=[60, 120, 240, 360],
                        help="training seconds at which to evaluate (the last one ends the run)")
    parser.add_argument("--lr-drop-at", type=float, help="seconds after which the rate is /10")
    parser.add_argument("--max-steps", type=int, default=100_000,
                        help="stop here too; LR_DECAY=cosine reaches 0 here")
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--val-images", type=int, default=120)
    parser.add_argument("--eval-limit", type=int, default=0, help="val images scored (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/convergence")
    args = parser.parse_args()

    import keras
    import numpy as np

    from trainer import Config, MaskRCNN
    from trainer.data.input import training_dataset
    from trainer.engine.training import (
        WarmupCosineSchedule,
        make_optimizer,
        recompute_bn_statistics,
    )
    from trainer.evaluation.run import evaluate
    from trainer.weights.by_name import save_weights

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = Config.from_yaml(args.config, args.overrides)
    keras.utils.set_random_seed(args.seed)
    data = prepare(out, args.train_images, args.val_images, int(config.IMAGE_SHAPE[0]),
                   args.seed)
    val_count = json.loads((data / "dataset.json").read_text())["splits"]["val"]["images"]
    model = MaskRCNN("training", config, model_dir=out / "checkpoints")
    optimizer = make_optimizer(config.LEARNING_RATE, config, end_step=args.max_steps)
    model.keras_model.compile(optimizer=optimizer)
    batches = iter(training_dataset(str(data), config))
    uses_moving_statistics = config.TRAIN_BN and config.NORM == "batch"

    rows: list[dict] = []
    trained, steps, window = 0.0, 0, []
    dropped = False
    for checkpoint in sorted(args.at):
        while trained < checkpoint and steps < args.max_steps:
            if args.lr_drop_at is not None and trained >= args.lr_drop_at and not dropped:
                schedule = optimizer._learning_rate
                if isinstance(schedule, WarmupCosineSchedule):
                    schedule.learning_rate /= 10.0
                    model.keras_model.make_train_function(force=True)
                else:
                    optimizer.learning_rate.assign(float(optimizer.learning_rate) / 10.0)
                dropped = True
            batch = next(batches)
            start = time.perf_counter()
            window.append(model.keras_model.train_on_batch(batch, return_dict=True))
            trained += time.perf_counter() - start
            steps += 1
        if not window:  # already past this checkpoint (the first step traces the graph)
            continue
        if uses_moving_statistics:
            recompute_bn_statistics(model.keras_model, batches, steps=8)
        weights = out / "checkpoints" / f"step{steps:06d}.h5"
        weights.parent.mkdir(parents=True, exist_ok=True)
        save_weights(model.keras_model, weights)
        result = evaluate(config, weights, data, out / f"eval-{steps:06d}",
                          limit=args.eval_limit or None, num_pictures=2, progress=False)
        losses = {k: round(float(np.mean([w[k] for w in window])), 4) for k in window[0]}
        window = []
        row = {"benchmark": "convergence", "config": args.config, "overrides": args.overrides,
               "seconds": round(trained, 1), "steps": steps,
               "images_seen": steps * config.BATCH_SIZE,
               "eval_images": min(args.eval_limit or val_count, val_count),
               **{k: result[k] for k in METRICS}, "losses": losses}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(out / "curve.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
        plot(rows, out / "curve.png", f"{args.config} {' '.join(args.overrides)}"[:120])
        if steps >= args.max_steps:
            break


if __name__ == "__main__":
    main()
