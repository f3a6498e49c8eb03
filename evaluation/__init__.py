"""Scoring predictions: COCO detection metrics (pycocotools), the confusion-matrix mIoU, and the writers of
prediction files (COCO results JSON, Cityscapes label-id PNGs)."""
