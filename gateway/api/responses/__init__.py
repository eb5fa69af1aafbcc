"""OpenAI's Responses API: its wire models (`protocol`), the translations to and from the gateway's internal chat
request and stream (`translate`), the stored responses (`store`) and the routes with the front end (`routes`)."""

from gateway.api.responses.protocol import LIMITED_MODELS
from gateway.api.responses.routes import router

__all__ = ["LIMITED_MODELS", "router"]
