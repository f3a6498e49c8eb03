"""Using a trained model: the predictor, the inference fast paths, ONNX export and drawing predictions."""

from .predictor import Predictor

__all__ = ["Predictor"]
