"""Throughput of `mrcnn data prepare` on synthetic shapes: one JSON line per configuration.

    .venv/bin/python bench/prepare.py [--count 400] [--image-size 128] [--workers 1 2]

images_per_second counts from the first task to the renamed output folder (worker start-up
included); peak_rss_mb is this process's peak resident memory (the writer side), which should
not grow with --count.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.data.prepare import prepare_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, nargs="+", default=[400])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    # TensorFlow is imported before timing, and here rather than at the top: spawned workers
    # re-import this module, and they must not pay for TensorFlow.
    from trainer.data import tfrecord  # noqa: F401
    for count in args.count:
        for workers in args.workers:
            with tempfile.TemporaryDirectory() as tmp:
                started = time.monotonic()
                summary = prepare_dataset("shapes", Path(tmp) / "ds", count=count,
                                          image_size=args.image_size, workers=workers,
                                          shards=4, progress=False)
                wall = time.monotonic() - started
                size = sum(p.stat().st_size for p in (Path(tmp) / "ds").iterdir())
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(json.dumps({
                "bench": "data_prepare", "source": "shapes", "count": count,
                "image_size": args.image_size, "workers": workers,
                "images_per_second": summary["images_per_second"],
                "wall_seconds": round(wall, 3), "output_mb": round(size / 2**20, 2),
                "peak_rss_mb": round(peak_kb / 1024, 1),
            }), flush=True)


if __name__ == "__main__":
    main()
