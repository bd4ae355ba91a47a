"""Ours against torchvision (and against an earlier checkout of ours), interleaved in one run.

    python bench/side_by_side.py --torch-python /work/tvenv/bin/python \\
        --before /tmp/before --rounds 3 --setting 256 --mode train

Each round runs every side once, one process each (peak memory is per process), in the order
before, now, torchvision: machine load that drifts during the run hits all sides alike.
Ours is always timed by this checkout's bench/train_step.py; PYTHONPATH picks whose `trainer`
it imports (`--before`: a checkout of the baseline commit, e.g. `git archive BASE | tar -x`).
Prints every measurement as it lands, then one JSON line per side with the medians, and the
ratios ours / torchvision (images/s, peak RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
# The environment each side starts from, taken before train_step imports `trainer`, whose
# start-up sets TF_ENABLE_ONEDNN_OPTS: each side's own code decides it (an older checkout's
# trainer did not, so "before" runs TensorFlow's default).
ENVIRONMENT = dict(os.environ)
sys.path.insert(0, str(HERE))
from train_step import SETTING_256  # noqa: E402  (bench/, beside this script)

# torchvision_step.py arguments for the demo preset's sizes (its backbone stays ResNet-50).
TORCH_DEMO = ["--size", "128", "--rpn-anchors", "64", "--pre-nms", "1000",
              "--post-nms-train", "200", "--post-nms-infer", "100", "--rois", "32",
              "--detections", "16"]


def run(command: list[str], env: dict) -> dict:
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-python", required=True)
    parser.add_argument("--before", default=None, help="a checkout of the baseline commit")
    parser.add_argument("--now", default=None,
                        help="the checkout to time as `now` (default: this one)")
    parser.add_argument("--setting", choices=("256", "demo"), default="256")
    parser.add_argument("--mode", choices=("train", "infer"), default="train")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    now = args.now or str(HERE.parent)
    ours = [sys.executable, str(HERE / "train_step.py"), "--config",
            str(HERE.parent / "configs" / "demo.yaml"), "--steps", str(args.steps),
            "--warmup", str(args.warmup)]
    for item in SETTING_256 if args.setting == "256" else []:
        ours += ["--set", item]
    if args.mode == "infer":
        ours.append("--infer")
    peer = [args.torch_python, str(HERE / "torchvision_step.py"), "--mode", args.mode,
            "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.setting == "demo":
        peer += TORCH_DEMO
    sides = ([("before", ours, args.before)] if args.before else []) + [
        ("now", ours, now), ("torchvision", peer, None)]

    results: dict[str, list[dict]] = {name: [] for name, _, _ in sides}
    for round_index in range(args.rounds):
        for name, command, tree in sides:
            env = dict(ENVIRONMENT)
            if tree:
                env["PYTHONPATH"] = tree
            result = run(command, env)
            results[name].append(result)
            print(json.dumps({"round": round_index, "side": name,
                              "images_per_second": result["images_per_second"],
                              "peak_rss_mb": result["peak_rss_mb"]}), flush=True)
    medians = {}
    for name, runs in results.items():
        medians[name] = {
            "images_per_second": statistics.median(r["images_per_second"] for r in runs),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        }
        print(json.dumps({"side": name, "setting": args.setting, "mode": args.mode,
                          "rounds": args.rounds, **medians[name]}), flush=True)
    peer_median = medians["torchvision"]
    for name in medians:
        if name != "torchvision":
            print(json.dumps({
                "ratio": f"{name}/torchvision", "setting": args.setting, "mode": args.mode,
                "images_per_second": round(medians[name]["images_per_second"]
                                           / peer_median["images_per_second"], 3),
                "peak_rss": round(medians[name]["peak_rss_mb"] / peer_median["peak_rss_mb"], 3),
            }), flush=True)


if __name__ == "__main__":
    main()
