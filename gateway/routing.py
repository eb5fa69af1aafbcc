"""Which engine serves a request: the public model names clients send in `model`, mapped to engines."""

from __future__ import annotations

from engines.base import Engine
from gateway.errors import model_not_found


class ModelRouter:
    def __init__(self) -> None:
        self._engines: dict[str, Engine] = {}

    def add(self, name: str, engine: Engine) -> None:
        self._engines[name] = engine

    def resolve(self, model: str) -> Engine:
        try:
            return self._engines[model]
        except KeyError:
            raise model_not_found(model) from None

    def names(self) -> list[str]:
        return list(self._engines)

    def engines(self) -> list[Engine]:
        return list(self._engines.values())
