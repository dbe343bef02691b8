"""The vision-language model (no Ray imports here)."""
from .vlm import Encoded, VisionLanguageModel, count_params, is_moe_layer

__all__ = ["Encoded", "VisionLanguageModel", "count_params", "is_moe_layer"]
