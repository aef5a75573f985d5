"""The one client for OpenAI-compatible ``/chat/completions`` endpoints, under the LLM
explainer (:class:`caft_tl.directions.LLMExplainer`) and the HTTP judge
(:class:`caft_tl.evals.HTTPJudge`): retries with backoff that honours ``Retry-After``, an
optional rate limit shared by threads, and an SQLite cache of parsed replies."""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import random
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# Besides 5xx: request timeout, conflict, too early, too many requests.
RETRY_STATUS = frozenset({408, 409, 425, 429})


class HTTPRefused(Exception):
    """The server refused the request (a 4xx other than :data:`RETRY_STATUS`): retrying
    would not help."""


class HTTPGaveUp(Exception):
    """Every attempt failed with an error worth retrying (5xx, 429, timeouts, dropped
    connections, replies that are not JSON)."""


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta seconds or an HTTP date (a date
    in the past is 0); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class RateLimiter:
    """Spaces request starts at least ``60 / per_minute`` seconds apart, across threads."""

    def __init__(self, per_minute: float | None) -> None:
        self.interval = 0.0 if not per_minute else 60.0 / per_minute
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        time.sleep(max(0.0, start - now))


class ReplyCache:
    """Replies by request hash in SQLite: each is committed as it arrives, so a killed run
    keeps what it had paid for, and parallel processes share the file safely."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=60)
        with self.lock, self.db:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS replies "
                "(key TEXT PRIMARY KEY, reply TEXT, created TEXT)"
            )

    def get(self, key: str) -> Any | None:
        with self.lock:
            row = self.db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, reply: Any) -> None:
        with self.lock, self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO replies VALUES (?, ?, datetime('now'))",
                (key, json.dumps(reply)),
            )

    def __len__(self) -> int:
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]


def default_cache(name: str) -> Path:
    """``name`` in the caft-tl user cache folder (where the embedded model is converted)."""
    from caft_tl.models import cache_dir

    return cache_dir() / name


class ChatClient:
    """POSTs to ``base_url + "/chat/completions"``.

    The API key is read from ``$api_key_env`` at request time (unset: no ``Authorization``
    header, as local servers need none). Retryable failures (5xx, :data:`RETRY_STATUS`,
    timeouts, dropped connections, replies that are not JSON) are retried ``max_retries``
    times, waiting ``min(max_backoff, backoff * 2**attempt)`` seconds times a random factor
    in [0.5, 1] (so parallel clients do not retry in step), or the server's ``Retry-After``
    when that is longer. Other HTTP errors raise :class:`HTTPRefused` at once. ``cache``
    (an SQLite file, or None) keeps each request's *parsed* reply under a hash of the URL and
    the request body; ``requests`` counts HTTP requests sent, retries included.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        requests_per_minute: float | None = None,
        cache: str | os.PathLike | None = None,
    ) -> None:
        if max_retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("need max_retries >= 0, timeout > 0 and backoff >= 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key_env, self.timeout, self.max_retries = api_key_env, timeout, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.limiter = RateLimiter(requests_per_minute)
        self.cache = None if cache is None else ReplyCache(cache)
        self.requests = 0

    def key(self, body: Mapping[str, Any]) -> str:
        return hashlib.sha256(json.dumps([self.url, body], sort_keys=True).encode()).hexdigest()

    def cached(self, body: Mapping[str, Any]) -> Any | None:
        """The cached parsed reply to ``body``, or None."""
        return None if self.cache is None else self.cache.get(self.key(body))

    def post(self, body: Mapping[str, Any], parse: Callable[[Any], Any] = lambda r: r) -> Any:
        """``parse(reply)`` for ``body``, from the cache or else :meth:`fetch`."""
        hit = self.cached(body)
        return hit if hit is not None else self.fetch(body, parse)

    def fetch(self, body: Mapping[str, Any], parse: Callable[[Any], Any] = lambda r: r) -> Any:
        """``parse(reply)`` for ``body`` from the server, then cached (for callers that have
        looked in the cache already). ``parse`` errors propagate unretried: a well-formed
        reply without what the caller needs is the server's answer, not a transient
        failure."""
        value = parse(self._with_retries(body))
        if self.cache is not None:
            self.cache.put(self.key(body), value)
        return value

    def _with_retries(self, body: Mapping[str, Any]) -> Any:
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            self.limiter.wait()
            asked = None
            try:
                return self._send(body)
            except urllib.error.HTTPError as exc:
                text = exc.read()[:500].decode("utf-8", "replace")
                if exc.code not in RETRY_STATUS and exc.code < 500:
                    raise HTTPRefused(self._refused(exc.code, text)) from None
                last, asked = (
                    f"HTTP {exc.code}: {text[:200]}",
                    retry_after(
                        exc.headers.get("Retry-After") if exc.headers is not None else None
                    ),
                )
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            except json.JSONDecodeError as exc:
                last = f"reply was not JSON ({exc})"
            if attempt < self.max_retries:
                delay = min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1)
                time.sleep(max(delay, asked or 0.0))
        raise HTTPGaveUp(f"{self.url}: gave up after {self.max_retries + 1} attempts ({last})")

    def _refused(self, code: int, text: str) -> str:
        hint = ""
        if code in (401, 403):
            has = "is set" if os.environ.get(self.api_key_env) else "is not set"
            hint = f" (the key comes from ${self.api_key_env}, which {has})"
        return f"{self.url} refused the request: HTTP {code}{hint}: {text}"

    def _send(self, body: Mapping[str, Any]) -> Any:
        headers = {"Content-Type": "application/json"}
        if key := os.environ.get(self.api_key_env):
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        self.requests += 1
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read().decode("utf-8"))
