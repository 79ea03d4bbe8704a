"""URLs, one protocol's fsspec filesystem, requests with retries, and errors that name the URL.

**Credentials** come from each protocol's usual environment and profile (``AWS_*`` variables,
``~/.aws``, instance roles, ``GOOGLE_APPLICATION_CREDENTIALS``...), never from a config file:
keys such as ``key``/``secret``/``token`` in the source or its ``storage_options`` are a
one-line :class:`ConfigError` (:func:`check_no_secrets`). ``storage_options`` holds non-secret
settings (``endpoint_url``, ``client_kwargs: {region_name: ...}``, ``anon``).

**Errors and time bounds.** Every request is bounded (``timeout_s``, default 30 s: s3's connect
and read timeouts and fsspec's overall bound on each call); transient failures (connection
refused or reset, timeouts, 5xx) are retried ``retries`` times (default 3) with exponential
backoff (0.1 s, 0.2 s, 0.4 s ...); "no such bucket/object" and "permission denied" are not
retried. What still fails is one line naming the URL and the problem: a :class:`DataError` when
the source is opened, a :class:`SampleError` for a sample read (raised, or a counted skip under
``on_error: skip``). Every attempt is counted in :data:`loaders.remote.stats.STATS`.
"""
from __future__ import annotations

import os
import re
import time
from typing import Callable, Dict, Mapping, Optional, Tuple

from ..errors import ConfigError, DataError, SampleError
from .stats import count

__all__ = ["SECRET_KEYS", "is_url", "protocol_of", "check_no_secrets", "RemoteStore"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
#: config / storage_options keys that hold secrets: refused (credentials come from the environment)
SECRET_KEYS = ("key", "secret", "token", "password", "username", "access_key", "secret_key", "access_key_id",
               "secret_access_key", "session_token", "aws_access_key_id", "aws_secret_access_key",
               "aws_session_token", "credentials", "client_secret", "account_key", "sas_token", "connection_string")
_BACKOFF_S = 0.1


def is_url(path) -> bool:
    """Whether ``path`` (or every item of a list) is a ``protocol://`` URL."""
    if isinstance(path, (list, tuple)):
        return bool(path) and all(is_url(p) for p in path)
    return isinstance(path, str) and bool(_URL.match(path))


def protocol_of(url: str) -> str:
    """``"s3"`` for ``"S3://bucket/key"``: the lower-cased part before ``://``."""
    return url.split("://", 1)[0].lower()


def check_no_secrets(options: Mapping, where: str) -> None:
    """ConfigError for the first secret-looking key anywhere in ``options`` (nested mappings too)."""
    for k, v in options.items():
        if str(k).lower() in SECRET_KEYS:
            raise ConfigError(f"{where}: '{k}' looks like a credential; credentials are never read from the config "
                              f"file: use the protocol's environment variables or profile (e.g. AWS_ACCESS_KEY_ID / "
                              f"~/.aws/credentials, GOOGLE_APPLICATION_CREDENTIALS)")
        if isinstance(v, Mapping):
            check_no_secrets(v, where)


def _problem(e: BaseException, protocol: str = "") -> Tuple[str, bool]:
    """(what went wrong in words, whether retrying may help)."""
    if isinstance(e, FileNotFoundError):
        if protocol in ("http", "https"):  # fsspec's HTTP driver reports unreachable servers this way too
            return "not found (or the server cannot be reached)", False
        return "no such bucket or object", False
    if isinstance(e, PermissionError):
        return "permission denied (credentials come from the environment or profile)", False
    if isinstance(e, (IsADirectoryError, NotADirectoryError, ValueError, TypeError, KeyError, ImportError)):
        return "invalid request", False
    name = type(e).__name__.lower()
    text = str(e).lower()
    if "timeout" in name or "timed out" in text or isinstance(e, TimeoutError):
        return "timed out", True
    if "connect" in name or "could not connect" in text or isinstance(e, ConnectionError):
        return "cannot connect", True
    return "request failed", True


class RemoteStore:
    """One protocol's filesystem (made lazily in each process) and requests with retries.

    ``storage_options``: fsspec options (no secrets). ``retries``: extra attempts after a
    transient failure; ``timeout_s``: bound on each request.
    """

    def __init__(self, protocol: str, storage_options: Optional[Mapping] = None, *, retries: int = 3,
                 timeout_s: float = 30.0):
        self.protocol = protocol
        self.options = dict(storage_options or {})
        check_no_secrets(self.options, "shards source storage_options")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"shards source: retries must be an integer >= 0, got {retries!r}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ConfigError(f"shards source: timeout_s must be a number of seconds > 0, got {timeout_s!r}")
        self.retries, self.timeout_s = int(retries), float(timeout_s)
        self._fs, self._pid = None, None

    def __getstate__(self):
        return {**self.__dict__, "_fs": None, "_pid": None}

    def _fs_options(self) -> Dict:
        opts = dict(self.options)
        if self.protocol in ("s3", "s3a"):  # bounded requests; retries are ours (below)
            ck = dict(opts.get("config_kwargs") or {})
            ck.setdefault("connect_timeout", self.timeout_s)
            ck.setdefault("read_timeout", self.timeout_s)
            ck.setdefault("retries", {"total_max_attempts": 1})
            opts["config_kwargs"] = ck
        return opts

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            import fsspec
            try:
                fs = fsspec.filesystem(self.protocol, skip_instance_cache=True, **self._fs_options())
            except ImportError as e:
                raise ConfigError(f"shards URLs '{self.protocol}://...' need an fsspec driver: {e} "
                                  f"(pip install 'fastssl[remote]' or 'fastssl[gcs]')") from e
            except ValueError as e:
                raise ConfigError(f"shards URLs '{self.protocol}://...': {e}") from e
            if hasattr(fs, "retries"):
                fs.retries = 1  # s3fs' own retry loop: ours counts and bounds them
            self._fs, self._pid = fs, os.getpid()
        return self._fs

    def call(self, url: str, fn: Callable, *args, error=DataError, what: str = "", bounded: bool = True,
             requests: int = 1, **kw):
        """``fn(*args, **kw)``, retried on transient failures; then ``error`` naming ``url`` and the
        problem. ``bounded``: ``fn`` is a method of ``self.fs`` that takes fsspec's ``timeout``;
        ``requests``: how many requests one attempt makes (for :data:`STATS`)."""
        if bounded and getattr(self.fs, "async_impl", False):
            kw["timeout"] = self.timeout_s  # fsspec's sync wrapper bounds the whole call
        for attempt in range(self.retries + 1):
            try:
                count(requests=requests)
                return fn(*args, **kw)
            except Exception as e:  # noqa: BLE001  (classified below)
                problem, transient = _problem(e, self.protocol)
                if not transient or attempt == self.retries:
                    tries = f" after {attempt + 1} attempts" if attempt else ""
                    msg = f"{url}: {what + ': ' if what else ''}{problem}{tries} ({type(e).__name__}: " \
                          f"{' '.join(str(e).split())[:200]})"
                    raise (error(msg, path=url) if issubclass(error, SampleError) else error(msg)) from e
                count(retries=1)
                time.sleep(_BACKOFF_S * 2 ** attempt)

    def strip(self, url: str) -> str:
        return self.fs._strip_protocol(url)

    def url(self, path: str) -> str:
        return path if is_url(path) else f"{self.protocol}://{path}"

