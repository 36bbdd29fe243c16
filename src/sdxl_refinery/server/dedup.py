"""Which earlier job a request is the same operation as: Idempotency-Key, or a retry of the same call.

The openai SDK retries a call that timed out (twice by default), and other clients retry too; without
this, each retry queued another full render. A request now attaches to an earlier job when:
- it carries the same `Idempotency-Key` from the same caller within 24 hours (every route that submits);
- or, on the synchronous routes (OpenAI, A1111), it is the same body from the same caller within an hour
  and no connected client has received that job's images yet (a retry after a timeout or a dropped
  connection). Once an answer was delivered, asking again renders again, as a user pressing "regenerate"
  expects.
The caller is a hash of the presented API key, never the key itself.
"""

from __future__ import annotations

import hashlib

from fastapi import Request

from ..errors import InvalidRequest
from ..jobs.models import JobRequest
from ..jobs.store import Dedup
from .security import presented_key

KEY_WINDOW_SECONDS = 24 * 3600
RETRY_WINDOW_SECONDS = 3600
MAX_KEY_LENGTH = 255


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def dedup_for(http: Request, request: JobRequest, client: str, retries_attach: bool) -> Dedup | None:
    """The `Dedup` of this submission, or None when it must always queue a new job.

    Raises:
        InvalidRequest: an Idempotency-Key longer than 255 characters.
    """
    caller = _digest("caller", presented_key(http.headers.get("authorization", "")) or "")
    key = (http.headers.get("idempotency-key") or "").strip() or None  # blank: no key (clients send it empty)
    if key is not None:
        if len(key) > MAX_KEY_LENGTH:
            raise InvalidRequest("Idempotency-Key", f"must be at most {MAX_KEY_LENGTH} characters")
        return Dedup(_digest(caller, "key", client, key), KEY_WINDOW_SECONDS, unanswered_only=False)
    if retries_attach:
        return Dedup(_digest(caller, "body", client, request.model_dump_json()), RETRY_WINDOW_SECONDS, True)
    return None
