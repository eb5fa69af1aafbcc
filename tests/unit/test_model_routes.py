"""The key middleware leaves the admission of model requests to `dispatch` (one call to shared state for the request's
count and its tokens' hold): MODEL_ROUTES must name exactly the routes whose endpoint dispatches. A route missing from
it would be counted twice; one named there that does not dispatch would never be checked against its key's limits."""

from __future__ import annotations

import inspect

from gateway.api import chat, completions, embeddings, models, tokenize
from gateway.api.messages import routes as messages
from gateway.api.rerank import routes as rerank
from gateway.api.responses import routes as responses
from gateway.front.keys import MODEL_ROUTES

MODULES = (chat, completions, embeddings, rerank, models, tokenize, messages, responses)  # those with POST routes


def test_model_routes_are_the_routes_that_dispatch():
    posts = [route for module in MODULES for route in module.router.routes if "POST" in route.methods]
    dispatching = {route.path for route in posts if "await dispatch(" in inspect.getsource(route.endpoint)}
    assert dispatching == MODEL_ROUTES
