"""`make run` until the pipeline lands: the demo preset trained on generated shapes through the
Python API, printing the losses as they fall.

    python -m trainer.demo --config configs/demo.yaml [--epochs 3] [--workdir runs/demo]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--workdir", default="runs/demo")
    args = parser.parse_args(argv)

    from trainer import Config, MaskRCNN
    from trainer.data.prepare import prepare_dataset

    config = Config.from_yaml(args.config, args.overrides)
    workdir = Path(args.workdir)
    data = workdir / "data"
    prepare_dataset("shapes", data, count=args.images, image_size=int(config.IMAGE_SHAPE[0]),
                    val_fraction=0.125, shards=2, workers=1)
    model = MaskRCNN("training", config, model_dir=workdir / "checkpoints")
    history = model.train(data, data, learning_rate=config.LEARNING_RATE, epochs=args.epochs,
                          layers="all", verbose=2)
    losses = history.history
    print(f"\n{'epoch':>5} {'loss':>8} {'val_loss':>8}")
    for epoch, (loss, val) in enumerate(zip(losses["loss"], losses["val_loss"], strict=True), 1):
        print(f"{epoch:>5} {loss:8.3f} {val:8.3f}")
    print(f"\nloss {losses['loss'][0]:.3f} -> {losses['loss'][-1]:.3f}; checkpoints in "
          f"{model.log_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
