from engines.vllm.engine import VllmEngine

__all__ = ["VllmEngine"]
