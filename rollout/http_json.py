"""JSON over HTTP with retries (standard library only): what our clients of servers share (the
vLLM client, the HTTP teacher).

Connection refused or reset, a timeout and a 5xx may pass: they are retried with exponential
backoff, then raise `Unavailable`. A 4xx says our request was wrong: `Refused`, at once, since
asking again would not help.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request


class Unavailable(RuntimeError):
    def __init__(self, attempts: int, last: str):
        super().__init__(f"no answer after {attempts} attempt(s); last error: {last}")
        self.attempts, self.last = attempts, last


class Refused(ValueError):
    def __init__(self, code: int, message: str):
        super().__init__(f"HTTP {code}: {message}")
        self.code, self.message = code, message


def request(url: str, method: str, body: dict | None = None, *, timeout_s: float, retries: int,
            backoff_s: float = 0.5, raw: bool = False):
    """The answer's JSON (or text, with raw)."""
    data = None if body is None else json.dumps(body).encode()
    attempts, last = retries + 1, ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                payload = resp.read()
                return payload.decode() if raw else json.loads(payload or b"{}")
        except urllib.error.HTTPError as e:
            message = e.read().decode(errors="replace")
            if e.code < 500:
                raise Refused(e.code, message) from None
            last = f"HTTP {e.code}: {message}"
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out (URLError is an OSError)
            reason = getattr(e, "reason", e)
            last = f"timed out after {timeout_s}s" if isinstance(reason, TimeoutError) else \
                f"{type(reason).__name__}: {reason}"
    raise Unavailable(attempts, last)
