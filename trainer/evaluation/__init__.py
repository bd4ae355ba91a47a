"""Evaluation: COCO and VOC metrics, the evaluate run, its reports and the quality gate, and
pictures."""
