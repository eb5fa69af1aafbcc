"""local-llm-gateway: an OpenAI-compatible API over in-process engines."""
