"""An ASGI middleware for ``vllm serve`` (its ``--middleware`` option): a request body that puts a ``fastkvzip_*`` key
at its top level, where vLLM's OpenAI server would ignore it, gets HTTP 400 naming ``vllm_xargs``, the place that
reaches the engine. ``python -m fastkvzip_press.vllm serve`` adds it for engines with Fast KVzip."""

from __future__ import annotations

import json

from fastkvzip_press.vllm.settings import REQUEST_PREFIX

MIDDLEWARE = "fastkvzip_press.vllm.seam.http.MisplacedSettings"


def misplaced_keys(body: bytes) -> list[str]:
    """Top-level ``fastkvzip_*`` keys of a JSON request body (none for anything that is not a JSON object)."""
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return []
    if not isinstance(parsed, dict):
        return []
    return sorted(key for key in parsed if isinstance(key, str) and key.startswith(REQUEST_PREFIX))


class MisplacedSettings:
    """Refuses POST bodies with top-level ``fastkvzip_*`` keys; passes every other request on unchanged."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        messages, body = [], b""
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        keys = misplaced_keys(body)
        if keys:
            await _refuse(send, keys)
            return

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


async def _refuse(send, keys: list[str]) -> None:
    example = ", ".join(f'"{key}": ...' for key in keys)
    message = (
        f"{keys} at the top level of the request would be ignored: put Fast KVzip settings in vllm_xargs, e.g. "
        f'"vllm_xargs": {{{example}}}'
    )
    payload = json.dumps({"error": {"message": message, "type": "BadRequestError", "param": keys[0], "code": 400}})
    await send({"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": payload.encode()})
