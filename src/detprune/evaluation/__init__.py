"""Evaluation of detectors: COCO box AP/AR through pycocotools, and model cost."""
