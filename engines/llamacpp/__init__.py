from engines.llamacpp.engine import LlamaCppEngine

__all__ = ["LlamaCppEngine"]
