"""Shards and manifests at URLs: ``s3://``, ``gs://``, ``http(s)://`` (through fsspec, s3fs, gcsfs, aiohttp) and
webdataset's ``pipe:`` (a command that writes the object to stdout).

Our shard members have a fixed size, so a sample is one byte range: :class:`RangeFile` is a seekable, read-only file
over ranged GETs that fetches small pieces on a jump (a resumed run fetches about one member per sample it needs)
and growing windows, two of them read ahead in background threads, while reading goes on front to back (streaming
an epoch); the loader starts the next shard's first windows before it gets there (``RangeFile.prefetch``).
At most three windows per open file are held in memory; with a cache folder (``cache.py``) whole shards are also
downloaded to a node's disk in the background and read there once complete.

Every request goes through :meth:`Store.call`: a failure that may pass (refused or reset connection, timeout,
5xx, throttling) is retried with backoff until ``budget_s`` after the first failure is spent; one that will not (404,
403, bad credentials, a server that ignores Range) ends at once. Either ends as one :class:`RemoteError` naming the
URL, the endpoint and the cause. A request that stalls is cut by ``timeout_s``.

S3 settings come from botocore's usual places (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws``,
``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, ``AWS_DEFAULT_REGION``) and from ``storage_options`` (fsspec's keyword
arguments for the scheme, e.g. ``{"endpoint_url": "http://127.0.0.1:9000", "key": ..., "secret": ...}``), which
win. The endpoint is put into every S3 client this module makes, reads and uploads alike.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shlex
import subprocess
import threading
import time
import types
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

from ..errors import CorruptShardError, DataError

URL_RE = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://")
SCHEMES = ("s3", "gs", "gcs", "http", "https")
MIN_FETCH = 64 << 10  # first fetch after a jump: a few members, not a shard
MAX_FETCH = 4 << 20  # largest read-ahead window while reading front to back
GROWTH = 4  # each window read front to back is this many times the last (each request costs ~10 ms on a server)
AHEAD = 2  # windows in flight ahead of the one being read
PREFETCH_FIRST = 1 << 20  # first window of an object fetched before it is read (RangeFile.prefetch)
RETRY_FIRST_S, RETRY_MAX_S = 0.2, 5.0


class RemoteError(DataError):
    """A URL that could not be read or written, with the cause and what was tried."""

    def __init__(self, message: str, not_found: bool = False):
        super().__init__(message)
        self.not_found = not_found


def is_url(location, pipe: bool = True) -> bool:
    """Whether ``location`` is a URL (``s3://``, ``gs://``, ``http(s)://``, anything fsspec opens by a protocol) or,
    with ``pipe``, webdataset's ``pipe:COMMAND``; not a local path."""
    return isinstance(location, str) and ((pipe and location.startswith("pipe:")) or URL_RE.match(location) is not None)


def scheme_of(url: str) -> str:
    if url.startswith("pipe:"):
        return "pipe"
    m = URL_RE.match(url)
    return m.group("scheme") if m else "file"


def sibling(url: str, name: str) -> str:
    """The object called ``name`` next to ``url`` (a manifest's shards and tokenizer). For ``pipe:CMD`` the
    manifest's file name in CMD is replaced by ``name``, as webdataset users write one command per shard."""
    if url.startswith("pipe:"):
        base = posixpath.basename(_pipe_target(url))
        if not base or base not in url:
            raise DataError(f"{url}: cannot tell which word of the pipe: command names the manifest; put its URL or "
                            "path in the command (e.g. pipe:curl -s http://host/x-manifest.json)")
        i = url.rindex(base)
        return url[:i] + name + url[i + len(base):]
    if scheme_of(url) in ("http", "https"):
        url = url.split("?", 1)[0]  # a query belongs to the manifest's own URL, not to its neighbours
    return f"{url.rpartition('/')[0]}/{name}"


def _pipe_target(url: str) -> str:
    """The word of a pipe: command that names the object: the last one that looks like a URL or a path."""
    words = shlex.split(url[len("pipe:"):])
    for w in reversed(words):
        if "/" in w or w.endswith(".json") or w.endswith(".tar"):
            return w
    return words[-1] if words else ""


@dataclass(frozen=True)
class RemoteOptions:
    """How URLs are read: fsspec ``storage_options`` per scheme (or one mapping for every scheme), the retry budget,
    the timeout of one request, and the node's shard cache (``cache_dir`` bounded to ``cache_limit_bytes``; None:
    every shard is range-read, nothing is written to disk). Picklable, so DataLoader workers build their own
    clients from it."""

    storage_options: dict = field(default_factory=dict)
    budget_s: float = 120.0
    timeout_s: float = 30.0
    cache_dir: Optional[str] = None
    cache_limit_bytes: Optional[int] = None

    def for_scheme(self, scheme: str) -> dict:
        so = self.storage_options or {}
        if scheme in so and isinstance(so[scheme], dict):  # {"s3": {...}, "https": {...}}
            return dict(so[scheme])
        return {k: v for k, v in so.items() if not (k in SCHEMES and isinstance(v, dict))}


def s3_endpoint(options: dict) -> Optional[str]:
    """The S3 endpoint a client will use: storage_options' endpoint_url (or client_kwargs'), else the environment's
    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (some S3 paths of other libraries ignore these: we pass it explicitly)."""
    return (options.get("endpoint_url") or options.get("client_kwargs", {}).get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))


class Store:
    """fsspec filesystems for one process (built on first use, again after a fork) with bounded retries, and
    counters of what was fetched (``requests``, ``bytes``)."""

    def __init__(self, options: RemoteOptions | None = None):
        self.options = options or RemoteOptions()
        self._fs: dict[str, object] = {}
        self._pid = os.getpid()
        self.requests = self.bytes = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ clients
    def fs(self, scheme: str):
        if self._pid != os.getpid():  # a forked worker: the parent's event loop and sockets are not ours
            self._fs, self._pid = {}, os.getpid()
        if scheme not in self._fs:
            self._fs[scheme] = self._make_fs(scheme)
        return self._fs[scheme]

    def _make_fs(self, scheme: str):
        import fsspec

        opts = self.options.for_scheme(scheme)
        t = self.options.timeout_s
        try:
            if scheme == "s3":
                endpoint = s3_endpoint(opts)
                opts.pop("endpoint_url", None)
                client_kwargs = dict(opts.pop("client_kwargs", {}))
                if endpoint:
                    client_kwargs["endpoint_url"] = endpoint
                config = {"connect_timeout": t, "read_timeout": t, "retries": {"max_attempts": 1},
                          **opts.pop("config_kwargs", {})}
                return fsspec.filesystem("s3", client_kwargs=client_kwargs, config_kwargs=config,
                                         skip_instance_cache=True, **opts)
            if scheme in ("http", "https"):
                import aiohttp

                client_kwargs = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t),
                                 **opts.pop("client_kwargs", {})}
                return fsspec.filesystem("https" if scheme == "https" else "http", client_kwargs=client_kwargs,
                                         skip_instance_cache=True, **opts)
            if scheme in ("gs", "gcs"):
                import aiohttp

                # gcsfs bounds a request by requests_timeout only (its timeout is for a few sync calls)
                opts.setdefault("requests_timeout", aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t))
                if opts.get("endpoint_url") or os.environ.get("STORAGE_EMULATOR_HOST"):
                    # Another endpoint (an emulator, a GCS-compatible store) speaks the JSON API only: gcsfs's
                    # default filesystem also asks it for the bucket's type over gRPC, retrying without end
                    from gcsfs.core import GCSFileSystem
                    return _gcs_single_tries(GCSFileSystem(skip_instance_cache=True, timeout=t, **opts))
                return _gcs_single_tries(fsspec.filesystem("gcs", skip_instance_cache=True, timeout=t, **opts))
            return fsspec.filesystem(scheme, skip_instance_cache=True, **opts)
        except ImportError as e:
            raise DataError(f"reading {scheme}:// URLs needs {e.name} (pip install 'rtdist[remote]')") from None
        except (ValueError, TypeError) as e:
            raise DataError(f"data.storage_options for {scheme}:// are not accepted by fsspec: {e}") from None

    def where(self, url: str) -> str:
        """The endpoint a URL goes to, for messages."""
        scheme = scheme_of(url)
        if scheme == "s3":
            return f" (endpoint {s3_endpoint(self.options.for_scheme('s3')) or 'AWS default'})"
        if scheme in ("gs", "gcs"):
            endpoint = self.options.for_scheme(scheme).get("endpoint_url") or os.environ.get("STORAGE_EMULATOR_HOST")
            return f" (endpoint {endpoint})" if endpoint else ""
        return ""

    def credentials_hint(self, url: str) -> str:
        """What to check when the server behind ``url`` refuses us: which credentials were sent and where they were
        set (the access key id is named, never a secret)."""
        scheme = scheme_of(url)
        opts = self.options.for_scheme(scheme)
        if scheme == "s3":
            if opts.get("anon"):
                return ("no credentials were sent (data.storage_options anon: true): remove it and give key/secret, "
                        "or make the bucket public")
            profile = opts.get("profile") or os.environ.get("AWS_PROFILE")
            if opts.get("key"):
                key, where = opts["key"], "data.storage_options key/secret"
            elif os.environ.get("AWS_ACCESS_KEY_ID"):
                key, where = os.environ["AWS_ACCESS_KEY_ID"], "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
            elif profile:
                return (f"check the keys of profile {profile} in ~/.aws/credentials (or set data.storage_options "
                        "key/secret), and the bucket's permissions")
            else:
                return ("no access key was set, so botocore's defaults were used (~/.aws/credentials, the instance's "
                        "role): set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or data.storage_options key/secret, and "
                        "check the bucket's permissions")
            return (f"check the access key {key} and its secret ({where}; data.storage_options wins over the "
                    "environment and ~/.aws), and the bucket's permissions for that key")
        if scheme in ("gs", "gcs"):
            return ("check the credentials (data.storage_options token, GOOGLE_APPLICATION_CREDENTIALS, gcloud's "
                    "default login) and the bucket's permissions")
        if scheme in ("http", "https"):
            return "the server refused the request: give what it asks for in data.storage_options (e.g. headers)"
        return "check the credentials in data.storage_options and the object's permissions"

    # ------------------------------------------------------------------ requests
    def call(self, what: str, url: str, fn):
        """``fn()`` retried with backoff while its failure may pass, until ``budget_s`` after the first failure."""
        deadline, delay, tries = None, RETRY_FIRST_S, 0
        while True:
            tries += 1
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - every transport has its own exception tree
                permanent = permanent_cause(e, self.credentials_hint(url))
                if permanent:
                    raise RemoteError(f"{what} {url}{self.where(url)}: {permanent}",
                                      not_found=isinstance(e, FileNotFoundError)) from None
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.options.budget_s
                if now >= deadline:
                    raise RemoteError(
                        f"{what} {url}{self.where(url)}: {describe(e)}; still failing after {tries} tries over "
                        f"{self.options.budget_s:g} s (data.fetch_budget_s): is the server up and the endpoint "
                        "right?") from None
                time.sleep(min(delay, deadline - now))  # the last try comes at the deadline
                delay = min(delay * 2, RETRY_MAX_S)

    def read_range(self, url: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of ``url`` (fewer only at the object's end)."""
        scheme = scheme_of(url)
        if scheme == "pipe":
            raise DataError(f"{url}: pipe: objects are read whole (no ranges)")

        def get():
            data = self.fs(scheme).cat_file(url, start=start, end=end)
            if len(data) > end - start:
                raise _NoRange(len(data))
            return data
        return self._counted(self.call("reading", url, get))

    def read_all(self, url: str) -> bytes:
        scheme = scheme_of(url)
        return self._counted(self.call("reading", url, (lambda: _run_pipe(url, self.options.timeout_s))
                                       if scheme == "pipe" else (lambda: self.fs(scheme).cat_file(url))))

    def _counted(self, data: bytes) -> bytes:
        """``data``, counted in this store's requests and bytes fetched."""
        with self._lock:
            self.requests += 1
            self.bytes += len(data)
        return data

    def size(self, url: str) -> int:
        scheme = scheme_of(url)
        if scheme == "pipe":
            return len(self.read_all(url))
        info = self.call("looking up", url, lambda: self.fs(scheme).info(url))
        size = info.get("size")
        if size is None:
            raise RemoteError(f"looking up {url}: the server sends no size (Content-Length)")
        return int(size)

    def upload(self, local_path, url: str) -> None:
        """Put a finished local file at ``url``. An S3/GCS object appears only once its upload completes."""
        scheme = scheme_of(url)
        if scheme in ("http", "https", "pipe"):
            raise DataError(f"cannot write to {url}: {scheme} is read-only here (write to s3://, gs:// or a path)")
        self.call("uploading to", url, lambda: self.fs(scheme).put_file(str(local_path), url))

    def write_bytes(self, url: str, data: bytes) -> None:
        scheme = scheme_of(url)
        if scheme in ("http", "https", "pipe"):
            raise DataError(f"cannot write to {url}: {scheme} is read-only here (write to s3://, gs:// or a path)")
        self.call("uploading to", url, lambda: self.fs(scheme).pipe_file(url, data))


def _gcs_single_tries(fs):
    """``fs`` (a gcsfs filesystem) making each request once. gcsfs retries a failed request itself (6 tries, 31-36 s
    of backoff) inside each of :meth:`Store.call`'s tries, past ``data.fetch_budget_s``; without its loop our budget
    bounds gs:// as it bounds every other scheme. A gcsfs without the undecorated request keeps its own retries."""
    request = getattr(type(fs)._request, "__wrapped__", None)
    if request is not None:
        fs._request = types.MethodType(request, fs)
    return fs


class _NoRange(Exception):
    def __init__(self, got: int):
        super().__init__(f"the server ignored the Range header (sent {got} bytes): serve the shards from a server "
                         "that supports ranges, or use pipe:")


def _run_pipe(url: str, timeout_s: float) -> bytes:
    cmd = url[len("pipe:"):]
    try:
        p = subprocess.run(cmd, shell=True, capture_output=True, timeout=max(timeout_s, 60.0))
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"the command ran over {max(timeout_s, 60.0):g} s") from None
    if p.returncode:
        err = p.stderr.decode(errors="replace").strip().splitlines()
        raise ConnectionError(f"the command exited {p.returncode}: {err[-1] if err else 'no message'}")
    return p.stdout


def describe(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return f"{type(e).__name__}: {' '.join(text.split())[:300]}"


CREDENTIAL_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken",
                    "InvalidClientTokenId")


def error_code(e: BaseException) -> Optional[str]:
    """The S3 error code (``InvalidAccessKeyId``, ``SignatureDoesNotMatch``, ...) behind ``e``: s3fs turns botocore's
    ClientError into a PermissionError or FileNotFoundError holding only the message, the ClientError as its cause."""
    for err in (e, e.__cause__):
        response = getattr(err, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            return response["Error"].get("Code")
    return None


def permanent_cause(e: BaseException, credentials: str = "check the credentials and the bucket's permissions"
                    ) -> Optional[str]:
    """What makes ``e`` a failure retrying cannot fix (None: it may pass); ``credentials`` says what to check
    when the server refused ours (:meth:`Store.credentials_hint`)."""
    if isinstance(e, _NoRange):
        return str(e)
    if isinstance(e, FileNotFoundError):
        return "not found (404): is the manifest's location right, and was every shard uploaded?"
    code = error_code(e)
    text = str(e)
    if code is None:
        code = next((c for c in CREDENTIAL_CODES + ("NoSuchBucket", "InvalidBucketName") if c in text), None)
    forbidden = isinstance(e, OSError) and text.startswith("Forbidden:")  # gcsfs's 403
    if isinstance(e, PermissionError) or code in CREDENTIAL_CODES or forbidden:
        said = " ".join(text.split())[:200] or type(e).__name__
        return f"access denied ({code or type(e).__name__}: {said}): {credentials}"
    if code in ("NoSuchBucket", "InvalidBucketName"):
        return f"{code}: {describe(e)} (check the bucket name and the endpoint)"
    status = getattr(e, "status", None)  # aiohttp's ClientResponseError
    if not isinstance(status, int) and isinstance(getattr(e, "response", None), dict):  # botocore's ClientError
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if not isinstance(status, int) and isinstance(getattr(e, "code", None), int):  # gcsfs's HttpError
        status = e.code
    if status in (401, 403):
        return f"access denied (HTTP {status}: {describe(e)}): {credentials}"
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 425, 429):
        return f"HTTP {status} ({describe(e)})"
    return None


class SeekableReader:
    """The file protocol's position keeping for a read-only file of known ``size`` (subclasses set ``pos`` and
    ``size`` and define ``read``)."""

    pos: int
    size: int

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


class RangeFile(SeekableReader):
    """A read-only, seekable file over ranged reads of ``url`` of known ``size`` (see the module docstring).

    Reading it front to back also hashes it: at the end, a ``sha256`` other than the expected one raises
    ``CorruptShardError`` naming the URL (parts read by jumps are checked by the reader's member checks only)."""

    def __init__(self, store: Store, url: str, size: int, sha256: Optional[str] = None, max_fetch: int = MAX_FETCH,
                 ahead: int = AHEAD):
        self.store, self.url, self.size, self.expected = store, url, size, sha256
        self.max_fetch, self.ahead = max_fetch, ahead  # a shard also being downloaded whole reads ahead less
        self.pos = 0
        self._chunks: dict[int, bytes] = {}  # start -> bytes: the window being read
        self._ahead: deque = deque()  # (start, end, future): the next windows, in flight in background threads
        self._window = MIN_FETCH
        self._last_end = -1
        self._hash, self._hashed = hashlib.sha256(), 0  # contiguous bytes from 0 hashed so far

    def prefetch(self) -> None:
        """Start fetching from the first byte in the background: the reader will read this object front to back
        next (e.g. the next shard of an epoch), and its first read then waits on no request of its own."""
        if self._last_end == -1 and not self._ahead:
            self._last_end, self._window = 0, PREFETCH_FIRST // GROWTH
            self._fill(0)

    # file protocol -----------------------------------------------------------------
    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        for start, chunk in self._chunks.items():  # the common case (a member inside the current window): one copy
            if start <= self.pos and end <= start + len(chunk):
                data = chunk[self.pos - start:end - start]
                self.pos = end
                return data
        out = bytearray()
        while self.pos < end:
            start, chunk = self._chunk_at(self.pos, end)
            piece = chunk[self.pos - start:end - start]
            if not piece:  # the object is shorter than the manifest says
                break
            out += piece
            self.pos += len(piece)
        return bytes(out)

    def close(self) -> None:
        self._chunks.clear()
        self._ahead.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # windows --------------------------------------------------------------------------
    def _chunk_at(self, pos: int, want_end: int) -> tuple[int, bytes]:
        for start, chunk in self._chunks.items():
            if start <= pos < start + len(chunk):
                return start, chunk
        sequential = pos == self._last_end
        if self._ahead and self._ahead[0][0] == pos:
            start, _, future = self._ahead.popleft()
            chunk = future.result()
        else:  # a jump (windows fetched ahead are dropped), or reading went past them
            self._ahead.clear()
            self._window = min(self.max_fetch, self._window * GROWTH) if sequential else MIN_FETCH
            start = pos
            chunk = self.store.read_range(self.url, pos, min(self.size, max(want_end, pos + self._window)))
        self._chunks = {start: chunk}
        self._last_end = start + len(chunk)
        self._account(start, chunk)
        if sequential:  # streaming: keep the next windows in flight while this one is used
            self._fill(self._last_end)
        return start, chunk

    def _fill(self, end: int) -> None:
        """Windows after byte ``end`` in flight, up to ``self.ahead`` of them, each ``GROWTH`` x the last (to
        ``max_fetch``): small ones first so that a short read fetches little, then large ones, fewer requests."""
        nxt = self._ahead[-1][1] if self._ahead else end
        while len(self._ahead) < self.ahead and nxt < self.size:
            self._window = min(self.max_fetch, self._window * GROWTH)
            stop = min(self.size, nxt + self._window)
            self._ahead.append((nxt, stop, _pool().submit(self.store.read_range, self.url, nxt, stop)))
            nxt = stop

    def _account(self, start: int, chunk: bytes) -> None:
        if self.expected is None or start != self._hashed:
            return
        self._hash.update(chunk)
        self._hashed += len(chunk)
        if self._hashed == self.size and self._hash.hexdigest() != self.expected:
            raise CorruptShardError(f"shard {self.url}: sha256 {self._hash.hexdigest()[:12]}.. is not the "
                                    f"manifest's {self.expected[:12]}..: the object was changed or damaged; "
                                    "re-upload it (tools/preprocess.py --output-prefix) or set "
                                    "data.skip_corrupt: true")


_POOL = None
_POOL_PID = None


def _pool() -> ThreadPoolExecutor:
    """Threads for read-ahead, one pool per process (a forked worker starts its own)."""
    global _POOL, _POOL_PID
    if _POOL is None or _POOL_PID != os.getpid():
        _POOL, _POOL_PID = ThreadPoolExecutor(4, thread_name_prefix="rtdist-readahead"), os.getpid()
    return _POOL


_STORES: dict = {}


def store_for(options: RemoteOptions | None) -> Store:
    """One Store per options per process (its clients and counters are shared by every reader there)."""
    key = (os.getpid(), repr(options))
    if key not in _STORES:
        _STORES[key] = Store(options)
    return _STORES[key]


def options_from_config(cfg) -> RemoteOptions:
    """``RemoteOptions`` of a run's ``data.*`` keys, checked against ``train.dist_timeout_s``: a rank still retrying
    when its peers' collective times out would end as a peer timeout rather than with the URL's error."""
    from ..errors import ConfigError

    d, t = cfg.data, cfg.train
    # Unset, they follow the step bound: half of it (at most 60 s) to retry, a request at most 20 s of that.
    budget = d.fetch_budget_s if d.fetch_budget_s is not None else min(60.0, t.dist_timeout_s / 2)
    request = d.request_timeout_s if d.request_timeout_s is not None else min(20.0, budget)
    if not 0 < request <= budget:
        raise ConfigError(f"data.request_timeout_s ({request:g}) must be > 0 and at most data.fetch_budget_s "
                          f"({budget:g})")
    if not budget < t.dist_timeout_s:
        raise ConfigError(f"data.fetch_budget_s ({budget:g}) must be below train.dist_timeout_s "
                          f"({t.dist_timeout_s:g}): a read failing that long must end as its own error on every rank, "
                          "not as a peer timeout")
    if not isinstance(d.storage_options, dict):
        raise ConfigError(f"data.storage_options must be a mapping of fsspec options, got {d.storage_options!r}")
    cache_dir = os.path.abspath(os.path.expanduser(d.cache_dir)) if d.cache_dir else None
    return RemoteOptions(dict(d.storage_options), float(budget), float(request), cache_dir,
                         int(d.cache_limit_gb * 1e9) if cache_dir else None)
