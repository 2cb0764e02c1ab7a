"""One IMDSv2 client: session token with TTL and early refresh, retry on 401, jittered retries."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from spotwatch.config import ImdsSettings
from spotwatch.errors import SpotwatchError

# requests (with charset_normalizer, a thirtieth of a second to import) is imported where a
# request is made: `flush`, `restore` and `status` never ask IMDS when the region is set.
if TYPE_CHECKING:
    import requests

IPV4_ENDPOINT = "http://169.254.169.254"
IPV6_ENDPOINT = "http://[fd00:ec2::254]"
ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
ENDPOINT_MODE_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE"
DISABLED_ENV = "AWS_EC2_METADATA_DISABLED"
REGION_PATH = "meta-data/placement/region"
TOKEN_PATH = "/latest/api/token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
# Refresh this long before the token expires (never more than a quarter of a short TTL).
REFRESH_MARGIN_SECONDS = 15.0


class ImdsError(SpotwatchError):
    """IMDS could not be reached or refused us after the retries."""


class ImdsDisabledError(ImdsError):
    """IMDS answered 403: switched off for this instance, or the request was refused."""


def resolve_endpoint(settings: ImdsSettings) -> str:
    """Config endpoint, else $AWS_EC2_METADATA_SERVICE_ENDPOINT, else by endpoint mode."""
    endpoint = settings.endpoint or os.environ.get(ENDPOINT_ENV)
    if endpoint:
        return endpoint.rstrip("/")
    mode = settings.endpoint_mode or os.environ.get(ENDPOINT_MODE_ENV, "IPv4")
    return IPV6_ENDPOINT if mode.lower() == "ipv6" else IPV4_ENDPOINT


def share_with_sdk(settings: ImdsSettings) -> None:
    """Have the AWS SDK ask the same IMDS for the instance role's credentials. botocore reads
    the endpoint and its mode from the environment (or ~/.aws/config), never from spotwatch's
    config: with `imds.endpoint_mode: IPv6` alone, on an IPv6-only instance, it looked for
    credentials at the IPv4 address and found none."""
    if settings.endpoint:
        os.environ[ENDPOINT_ENV] = settings.endpoint
    if settings.endpoint_mode:
        os.environ[ENDPOINT_MODE_ENV] = settings.endpoint_mode


def disabled_reason(settings: ImdsSettings) -> str | None:
    """Why IMDS must not be asked anything (no notices, no region), or None when it may be:
    off in the config, or AWS_EC2_METADATA_DISABLED=true, which every AWS SDK honours."""
    if not settings.enabled:
        return "imds.enabled is false"
    if os.environ.get(DISABLED_ENV, "").strip().lower() == "true":
        return f"{DISABLED_ENV}=true"
    return None


def probe_client(settings: ImdsSettings, attempts: int = 1) -> ImdsClient:
    """A client for one-off lookups such as the region: a short-lived token, few attempts."""
    return ImdsClient(resolve_endpoint(settings), token_ttl=60, timeout=settings.timeout,
                      attempts=attempts)


class ImdsClient:
    def __init__(
        self,
        endpoint: str,
        token_ttl: int = 21600,
        timeout: float = 2.0,
        attempts: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.token_ttl = token_ttl
        self.timeout = timeout
        self.attempts = attempts
        self._clock = clock
        # One session per polling thread: requests does not promise a shared one is safe.
        self._sessions = threading.local()
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_changed = threading.Condition()
        self._refreshing = False

    @classmethod
    def from_settings(cls, settings: ImdsSettings) -> ImdsClient:
        return cls(resolve_endpoint(settings), settings.token_ttl, settings.timeout)

    def get(self, path: str) -> str | None:
        """Text of a metadata item such as 'meta-data/spot/instance-action'; None when 404."""
        import requests

        url = f"{self.endpoint}/latest/{path.lstrip('/')}"
        last_error = "no attempt made"
        for attempt in range(self.attempts):
            if attempt:
                # Full jitter: IMDS is throttled per instance, so back off rather than hammer it.
                time.sleep(random.uniform(0, min(1.0, 0.1 * 2**attempt)))
            try:
                response = self._get_with_token(url)
            except requests.RequestException as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code == 200:
                return response.text
            if response.status_code == 404:
                return None
            if response.status_code == 403:
                raise ImdsDisabledError(f"IMDS refused {path} (403): is it disabled?")
            last_error = f"HTTP {response.status_code} for {path}"
        raise ImdsError(f"IMDS unreachable at {self.endpoint}: {last_error}")

    @property
    def _session(self) -> requests.Session:
        import requests

        session: requests.Session | None = getattr(self._sessions, "session", None)
        if session is None:
            session = self._sessions.session = requests.Session()
            # Proxies from the environment must never see metadata requests.
            session.trust_env = False
        return session

    def _get_with_token(self, url: str) -> requests.Response:
        response = self._session.get(url, headers={TOKEN_HEADER: self._token_value()},
                                     timeout=self.timeout)
        if response.status_code == 401:
            # The token expired or IMDS restarted: drop it and retry once with a fresh one.
            self.invalidate_token()
            response = self._session.get(url, headers={TOKEN_HEADER: self._token_value()},
                                         timeout=self.timeout)
        return response

    def invalidate_token(self) -> None:
        with self._token_changed:
            self._token = None

    def _token_value(self) -> str:
        """A valid token. One thread refreshes at a time, and no caller waits for it longer
        than `timeout`: the others keep using the old token while it is still valid."""
        with self._token_changed:
            margin = min(REFRESH_MARGIN_SECONDS, self.token_ttl / 4)
            now = self._clock()
            if self._token is not None and now < self._token_expires - margin:
                return self._token
            if self._refreshing:
                if self._token is not None and now < self._token_expires:
                    return self._token
                self._token_changed.wait_for(lambda: not self._refreshing, self.timeout)
                if self._token is None or self._clock() >= self._token_expires:
                    import requests

                    # Raised as a requests error so that get() counts it as an attempt.
                    raise requests.ConnectionError("no IMDS token: its request failed or hangs")
                return self._token
            self._refreshing = True
        return self._refresh_token()

    def _refresh_token(self) -> str:
        requested_at = self._clock()
        token: str | None = None
        try:
            token = self._fetch_token()
            return token
        finally:
            with self._token_changed:
                if token is not None:
                    self._token, self._token_expires = token, requested_at + self.token_ttl
                self._refreshing = False
                self._token_changed.notify_all()

    def _fetch_token(self) -> str:
        response = self._session.put(
            f"{self.endpoint}{TOKEN_PATH}",
            headers={TTL_HEADER: str(self.token_ttl)},
            timeout=self.timeout,
        )
        if response.status_code == 200 and response.text:
            return response.text
        if response.status_code == 403:
            raise ImdsDisabledError("IMDS refused the token request (403): is it disabled?")
        import requests

        # Raised as a requests error so that get() counts it as a retryable attempt.
        raise requests.ConnectionError(f"token request failed: HTTP {response.status_code}")
