"""The per-job secret every request to our vLLM servers carries (`Authorization: Bearer SECRET`).

vLLM's own `--api-key` guards only paths under /v1, /v2, /inference and /cohere
(vllm/entrypoints/serve/middleware/authenticate.py); the dev and weight-transfer endpoints we enable
(/collective_rpc, /reset_prefix_cache, /init_weight_transfer_engine, /update_weights, ...) would stay
open to anyone who reaches the port. `RequireSecret` is loaded into each server with
`--middleware gift_megatron.rollout.auth.RequireSecret` and refuses (401) every request without the
secret, on every path except GET /health, which stays open for readiness probes (it reveals only
that the server is up).

The secret travels only by environment (`GIFT_SERVER_SECRET`): the trainer generates one for servers it
starts; under Slurm the batch script generates one per job and exports it to the server steps and the
trainer step. It is never put on a command line (visible in `ps`), logged, or written to run_dir.
"""

from __future__ import annotations

import hmac
import os
import secrets

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

SECRET_ENV = "GIFT_SERVER_SECRET"
OPEN_PATHS = ("/health",)


def new_secret() -> str:
    return secrets.token_hex(32)


def secret_from_env() -> str:
    """The job's secret, for servers and clients started by someone else (Slurm)."""
    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        raise ValueError(f"{SECRET_ENV} is not set: servers given by URL (rollout.server_urls, slurm/) need the "
                         f"job's server secret in the environment of the servers and of the trainer, e.g. "
                         f"export {SECRET_ENV}=$(python -c 'import secrets; print(secrets.token_hex(32))')")
    return secret


def bearer(secret: str) -> dict[str, str]:
    """The header that authorises a request."""
    return {"Authorization": f"Bearer {secret}"}


class RequireSecret:
    """ASGI middleware: every HTTP or websocket request but GET /health must carry the bearer secret."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.expected = f"Bearer {secret_from_env()}".encode()  # fails the server's start without a secret

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await JSONResponse({"error": "Unauthorized: send the job's GIFT_SERVER_SECRET as a bearer token"},
                           status_code=401)(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        if scope["type"] == "http" and scope.get("method") in ("GET", "HEAD") and scope["path"] in OPEN_PATHS:
            return True
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        return hmac.compare_digest(given, self.expected)
