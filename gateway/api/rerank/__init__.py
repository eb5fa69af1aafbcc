"""Reranking in the shape vLLM, llama-server, Jina and Cohere serve: its wire models (`protocol`) and the routes with
the local serving (`routes`)."""

from gateway.api.rerank.protocol import LIMITED_MODELS
from gateway.api.rerank.routes import router, serve_locally

__all__ = ["LIMITED_MODELS", "router", "serve_locally"]
