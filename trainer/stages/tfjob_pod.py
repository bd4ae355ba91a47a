"""What each TFJob pod runs: `python -m trainer.stages.tfjob_pod ARGS_JSON`.

ARGS_JSON is trainer.stages.tfjob.pod_arguments: train_stage's keyword arguments, with
`out_root` instead of `out_dir` and the MLflow settings as two strings. The training operator
sets TF_CONFIG ({"cluster": ..., "task": {"type": "chief"|"worker", "index": i}}); the pod
writes its outputs to {out_root}/{type}-{index} (the launcher takes the chief's) and only the
chief records the upstream stages. Which replica writes checkpoints and MLflow records is
train_stage's business (WORKERS in the overrides). Exit codes: 0 done, 2 a UserError (the
job fails, no restart), 1 anything else.
"""

from __future__ import annotations

import json
import os
import sys

from trainer.errors import UserError


def replica(tf_config: str) -> tuple[str, int]:
    """(task type, index) from TF_CONFIG; a pod without it is the chief."""
    if not tf_config.strip():
        return "chief", 0
    try:
        task = json.loads(tf_config)["task"]
        return str(task["type"]).lower(), int(task["index"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"TF_CONFIG is not the training operator's JSON: {err}") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) != 1:
            raise UserError("usage: python -m trainer.stages.tfjob_pod ARGS_JSON")
        try:
            arguments = json.loads(argv[0])
        except ValueError as err:
            raise UserError(f"ARGS_JSON is not JSON: {err}") from None
        kind, index = replica(os.environ.get("TF_CONFIG", ""))
        from trainer.stages.tracking import TrackingSettings
        from trainer.stages.train import train_stage

        tracking = TrackingSettings.from_env(arguments.pop("mlflow_tracking_uri"),
                                             arguments.pop("mlflow_experiment"))
        out_root = arguments.pop("out_root")
        arguments["upstream"] = bool(arguments.get("upstream")) and kind == "chief"
        result = train_stage(**arguments, out_dir=f"{out_root}/{kind}-{index}",
                             tracking=tracking)
        print(json.dumps({"replica": f"{kind}-{index}", "epoch": result["epoch"],
                          "checkpoint": result["checkpoint"]}), flush=True)
        return 0
    except UserError as err:
        print(f"tfjob_pod: error: {err}", file=sys.stderr)
        return 2
    except KeyError as err:
        print(f"tfjob_pod: error: ARGS_JSON lacks {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
