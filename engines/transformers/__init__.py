from engines.transformers.engine import TransformersEngine

__all__ = ["TransformersEngine"]
