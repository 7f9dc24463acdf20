"""Benchmark metrics on predictions and scores: COCO caption metrics, VQA accuracy, retrieval recall (no models)."""
