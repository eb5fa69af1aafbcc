"""Rules of the test suite itself, checked on its source: breaking one makes tests fail for the machine's load
rather than for the product."""

from __future__ import annotations

import ast

from tests.conftest import TESTS

HTTPX_CALLS = {"get", "post", "put", "patch", "delete", "request", "stream", "Client", "AsyncClient"}


def _httpx_call_without_timeout(node: ast.AST) -> bool:
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return False
    called = node.func
    if not (isinstance(called.value, ast.Name) and called.value.id == "httpx" and called.attr in HTTPX_CALLS):
        return False
    # `**options` may carry a timeout (conftest's Server.get and Server.post add one)
    return not any(keyword.arg in ("timeout", None) for keyword in node.keywords)


def test_every_http_call_of_a_test_names_its_timeout():
    """httpx's 5 s default is too short for an answer on a loaded 2-core machine: a call names its timeout, or
    goes through `Server.get` / `Server.post` (60 s)."""
    missing = [
        f"{path.relative_to(TESTS)}:{node.lineno}"
        for path in sorted(TESTS.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if _httpx_call_without_timeout(node)
    ]
    assert not missing, missing
