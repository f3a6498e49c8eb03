"""The 80 COCO 2017 categories with their real (gapped, 1..90) ids, for tests that need a real-format file."""

from datasets.coco_names import COCO_CATEGORIES

__all__ = ["COCO_CATEGORIES"]
