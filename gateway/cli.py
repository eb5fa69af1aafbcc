"""`llm-gateway serve` / `python -m gateway`: every setting is also a flag (--model, --port, ...)."""

from __future__ import annotations

import argparse

import uvicorn

from gateway.settings import Settings


def parse_args(argv: list[str] | None = None) -> tuple[str, dict[str, str]]:
    parser = argparse.ArgumentParser(prog="llm-gateway", description="OpenAI-compatible local LLM gateway")
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="serve the OpenAI API (the default command)")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        serve.add_argument(flag, dest=name, default=None, help=f"{field.description} (env LLM_{name.upper()})")
    args = vars(parser.parse_args(argv if argv is not None else None))
    command = args.pop("command") or "serve"
    return command, {k: v for k, v in args.items() if v is not None}


def main(argv: list[str] | None = None) -> None:
    _, overrides = parse_args(argv)  # "serve" is the only command
    serve(Settings(**overrides))


def serve(settings: Settings) -> None:
    from gateway.app import create_app
    from gateway.front.server import http_protocol
    from gateway.telemetry.requests import configure_logging

    configure_logging(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        http=http_protocol(settings),  # httptools with limits on request heads, read timeouts and connections
        ws="none",  # no WebSocket routes: no upgrade is offered
        timeout_keep_alive=settings.keepalive_timeout,  # type: ignore[arg-type]  # uvicorn takes any number
        log_config=None,
        access_log=False,
        proxy_headers=False,  # nothing here reads the client's address: no middleware to rewrite it
        timeout_graceful_shutdown=10,
    )
