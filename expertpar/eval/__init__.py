"""Evaluation: zero-shot classification, retrieval recall, routing statistics."""
from .run import evaluate

__all__ = ["evaluate"]
