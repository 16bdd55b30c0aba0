"""Every byte mzsane reads or writes goes through here: the only module that knows about S3 (fsspec/s3fs).

URLs are plain strings everywhere else: a local path, ``s3://bucket/prefix`` against any S3-compatible
endpoint, or ``memory://prefix`` (fsspec's in-process store, for unit tests). Keeping the filesystem
choice in one module means a stage runs the same on a laptop, in CI against SeaweedFS, and in a RayJob
against a cluster's object store.

Credentials never come from config files: the endpoint is ``MZSANE_S3_ENDPOINT`` (or the standard
``AWS_ENDPOINT_URL``), keys are ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, region
``AWS_DEFAULT_REGION``. On Kubernetes they arrive from a Secret as environment variables.

Writes are atomic so a crash never leaves a half-written object that a reader would trust: locally a
temporary file in the same directory is renamed into place; on S3 an object becomes visible only when
its upload completes, so a plain PUT (or completed multipart upload) is already all-or-nothing.

Every S3 call is bounded (a hung endpoint, e.g. a SIGSTOPped server or one that accepts and never answers,
must give one line, not minutes of silence): ``MZSANE_S3_TIMEOUT_S`` (default 40 s) is the deadline of one
call. Inside it botocore gets connect/read timeouts of a quarter of it and s3fs and botocore two attempts
each (4 x read timeout <= the deadline), and calls that send or receive a known number of bytes run on a
small thread pool under a hard deadline of ``MZSANE_S3_TIMEOUT_S`` plus one second per MiB (a healthy slow
link is not a hang; a blocked upload has no read timeout to end it). A call that hits the deadline marks the
endpoint hung for one more deadline, so the clean-up after the error (abort an upload, remove a partial
checkpoint, a last log line) fails at once instead of waiting again. Nothing half-written becomes visible:
S3 objects appear only when their upload completes, and a checkpoint's config.json is written last.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec

from mzsane import deadlines
from mzsane.errors import StorageError, StoreUnavailableError

ENDPOINT_VARS = ("MZSANE_S3_ENDPOINT", "AWS_ENDPOINT_URL")
# other ways botocore finds credentials that are legitimate beside an explicit endpoint (profiles, web identity,
# container credentials); without any of them it would fall back to the EC2 instance-metadata lookup
_OTHER_CREDENTIAL_VARS = ("AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                          "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
TMP_PREFIX = ".tmp-"  # local atomic writes: ``.tmp-{pid}-{random}`` beside the target, renamed into place
_S3_ERRORS_UNREACHABLE = ("Could not connect", "ConnectTimeout", "EndpointConnectionError", "Connection refused",
                          "Cannot connect to host", "ConnectionError")
_S3_ERRORS_TIMEOUT = ("Read timeout", "ReadTimeout", "FSTimeoutError", "TimeoutError", "timed out")
TIMEOUT_ENV = "MZSANE_S3_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 40.0
_MIN_RATE_BYTES_S = 2**20  # the hard deadline of a transfer grows by 1 s per MiB: a slow healthy link is no hang
_ATTEMPTS = 2  # s3fs's retry loop and botocore's own, each: 4 attempts of at most timeout_s / 4 per call
_hung_until: dict[str, float] = {}  # endpoint -> monotonic time until which calls fail at once
_S3_ERRORS_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidClientTokenId",
                          "Forbidden", "403", "NoCredentialsError", "Unable to locate credentials")


def scheme(url: str) -> str:
    if "://" in url:
        return url.split("://", 1)[0]
    return "file"


def is_remote(url: str) -> bool:
    return scheme(url) not in ("file",)


def absolute(url: str) -> str:
    """Local paths made absolute (Ray workers run in their own working directory); URLs unchanged."""
    if not url or is_remote(url):
        return url
    path = url[len("file://"):] if url.startswith("file://") else url
    return os.path.abspath(os.path.expanduser(path))


def endpoint() -> str:
    for var in ENDPOINT_VARS:
        value = os.environ.get(var, "")
        if value:
            return value
    return ""


def timeout_s() -> float:
    """The deadline of one S3 call in seconds (``MZSANE_S3_TIMEOUT_S``, default 40)."""
    return deadlines.seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, StorageError)


def _attempt_timeouts() -> tuple[float, float]:
    """(connect, read) timeout of one HTTP attempt: 4 attempts (s3fs x botocore) fit in one deadline."""
    per_attempt = timeout_s() / (_ATTEMPTS * _ATTEMPTS)
    return min(5.0, per_attempt), per_attempt


def s3_options() -> dict[str, Any]:
    """fsspec/s3fs options from the environment; never logged (holds credentials)."""
    connect_s, read_s = _attempt_timeouts()
    options: dict[str, Any] = {"client_kwargs": {"region_name": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")},
                               "config_kwargs": {"retries": {"total_max_attempts": _ATTEMPTS},
                                                 "connect_timeout": connect_s, "read_timeout": read_s}}
    if endpoint():
        options["endpoint_url"] = endpoint()
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        options["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        options["secret"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    else:
        _require_credentials()
    return options


def _require_credentials() -> None:
    """With an explicit endpoint (SeaweedFS, MinIO) and no credentials, botocore would try the EC2 instance
    metadata service and fail after seconds with an unrelated message; say what is missing instead."""
    ep = endpoint()
    if not ep or any(os.environ.get(v) for v in _OTHER_CREDENTIAL_VARS):
        return
    if os.path.exists(os.path.expanduser("~/.aws/credentials")):
        return
    raise StorageError(f"S3 endpoint {ep} is set but no credentials are: export AWS_ACCESS_KEY_ID and "
                       f"AWS_SECRET_ACCESS_KEY (on Kubernetes, from the storage Secret)")


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    kind = scheme(url)
    if kind == "file":
        return fsspec.filesystem("file"), absolute(url)
    if kind in ("s3", "s3a"):
        # fsspec caches one instance per distinct options (endpoint, credentials), so a changed environment
        # gets a new client while repeated calls reuse the open connection pool; listings are never cached
        # because other workers write the same prefixes.
        fs = fsspec.filesystem("s3", use_listings_cache=False, **s3_options())
        fs.retries = _ATTEMPTS  # s3fs's own retry loop around botocore's (a class attribute, 5 by default)
        return fs, url.split("://", 1)[1].rstrip("/")
    if kind == "memory":
        return fsspec.filesystem("memory"), "/" + url.split("://", 1)[1].strip("/")
    raise StorageError(f"unsupported storage URL '{url}'; use a local path, s3://bucket/prefix or memory://prefix")


def _translate(err: BaseException, url: str, action: str) -> StorageError:
    text = f"{type(err).__name__}: {err}"
    where = endpoint() or "the default AWS endpoint"
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return disk_full(url)
    if is_remote(url) and (isinstance(err, TimeoutError) or any(s in text for s in _S3_ERRORS_TIMEOUT)):
        return _hung(url, action, timeout_s())
    if "NoSuchBucket" in text or "bucket does not exist" in text or "NoSuchBucket" in repr(err.__cause__):
        bucket = url.split("://", 1)[-1].split("/", 1)[0]
        return StorageError(f"cannot {action} '{url}': bucket '{bucket}' does not exist at {where}; create it "
                            f"first or fix the URL")
    if isinstance(err, (FileNotFoundError, KeyError)) or "NoSuchKey" in text or "Not Found" in text:
        return StorageError(f"cannot {action} '{url}': it does not exist; check the URL")
    if isinstance(err, PermissionError) and not is_remote(url):
        return StorageError(f"cannot {action} '{url}': permission denied; choose a writable location")
    if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EEXIST):
        return StorageError(f"cannot {action} '{url}': {os.strerror(err.errno).lower()} "
                            f"({err.filename or url}); choose a writable location")
    if any(s in text for s in _S3_ERRORS_UNREACHABLE):
        return StoreUnavailableError(f"cannot {action} '{url}': S3 endpoint {where} is unreachable; "
                                     f"check MZSANE_S3_ENDPOINT and that the server is running")
    if any(s in text for s in _S3_ERRORS_CREDENTIALS) or isinstance(err, PermissionError):
        return StoreUnavailableError(f"cannot {action} '{url}': access denied by {where}; "
                                     f"check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    first_line = text.splitlines()[0][:200] if text else type(err).__name__
    return StorageError(f"cannot {action} '{url}': {first_line}")


def _hung(url: str, action: str, limit_s: float) -> StorageError:
    """The one line for an endpoint that did not answer in time; later calls fail at once for one deadline."""
    where = endpoint() or "the default AWS endpoint"
    _hung_until[where] = time.monotonic() + timeout_s()
    return StoreUnavailableError(f"cannot {action} '{url}': S3 endpoint {where} did not answer within {limit_s:.0f} s "
                                 f"({TIMEOUT_ENV}); check that the server is running (not stopped or overloaded), "
                                 f"then retry or resume with --resume")


def _check_hung(url: str, action: str) -> None:
    where = endpoint() or "the default AWS endpoint"
    if time.monotonic() < _hung_until.get(where, 0.0):
        raise StoreUnavailableError(f"cannot {action} '{url}': S3 endpoint {where} did not answer within "
                                    f"{timeout_s():.0f} s moments ago ({TIMEOUT_ENV}); check that the server is "
                                    f"running (not stopped or overloaded), then retry or resume with --resume")


def _with_deadline(limit_s: float, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a daemon thread; ``TimeoutError`` after ``limit_s``. A daemon thread, not a pool's:
    an upload blocked on a stopped server may never return, and the interpreter joins pool threads at exit, so
    the process would hang after printing its error."""
    done, box = threading.Event(), {}

    def call() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as err:  # handed to the caller
            box["error"] = err
        finally:
            done.set()

    threading.Thread(target=call, name="mzsane-s3-call", daemon=True).start()
    if not done.wait(limit_s):
        raise TimeoutError(limit_s)
    if "error" in box:
        raise box["error"]
    return box["value"]


def _run(url: str, action: str, fn: Any, *args: Any, nbytes: int | None = 0) -> Any:
    """``fn(*args)`` with storage errors as one line; on S3 under a hard deadline of ``timeout_s()`` plus 1 s per
    MiB of ``nbytes`` (``None``: a transfer of unknown size, bounded by the per-attempt read timeouts alone).
    A call past its deadline is left behind in its daemon thread; nothing waits for it."""
    if scheme(url) not in ("s3", "s3a"):
        with _errors(url, action):
            return fn(*args)
    _check_hung(url, action)
    with _errors(url, action):
        if nbytes is None:
            return fn(*args)
        limit = timeout_s() + max(int(nbytes), 0) / _MIN_RATE_BYTES_S
        try:
            return _with_deadline(limit, fn, *args)
        except TimeoutError as err:
            if err.args == (limit,):  # our deadline, not a timeout raised inside the call
                raise _hung(url, action, limit) from None
            raise


def disk_full(url: str, needed: int = 0) -> StorageError:
    """The one-line ENOSPC error: which path, how much is free there, and (when known) how much is needed."""
    path = local_path(url) or url
    probe = os.path.dirname(path) if path else "."
    while probe and not os.path.isdir(probe):
        probe = os.path.dirname(probe)
    try:
        free = shutil.disk_usage(probe or ".").free
    except OSError:
        free = -1
    need = f"about {_mib(needed)} more are needed; " if needed > 0 else ""
    return StorageError(f"no space left on the device writing '{url}' ({_mib(free)} free there); {need}"
                        f"free space or choose another location (this run's partial files were removed)")


def _mib(n: int) -> str:
    return "unknown" if n < 0 else f"{n / 2**20:.1f} MiB"


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC, also when pyarrow or torch re-raised it without the errno (their messages keep the text)."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    return "No space left on device" in str(err) or "[Errno 28]" in str(err)


@contextlib.contextmanager
def _errors(url: str, action: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise _translate(err, url, action) from None
    except Exception as err:  # botocore/aiohttp errors without a common base
        if _from_s3_client(err):
            raise _translate(err, url, action) from None
        raise


def _from_s3_client(err: BaseException) -> bool:
    """Raised by the S3 client stack itself (botocore/aiohttp/s3fs/fsspec), not by the caller's code."""
    return type(err).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec")


def join(url: str, *parts: str) -> str:
    out = url.rstrip("/") if url not in ("/",) else url
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}" if "://" in out or out else part
    return out


def local_path(url: str) -> str | None:
    if scheme(url) != "file":
        return None
    return _fs(url)[1]


def exists(url: str) -> bool:
    fs, path = _fs(url)
    return bool(_run(url, "check", fs.exists, path))


def isdir(url: str) -> bool:
    fs, path = _fs(url)
    return bool(_run(url, "check", fs.isdir, path))


def listdir(url: str) -> list[str]:
    """Names of the direct children of a folder (empty when it does not exist)."""
    fs, path = _fs(url)

    def ls() -> list[str]:
        if not fs.exists(path):
            return []
        return fs.ls(path, detail=False, refresh=True) if is_remote(url) else fs.ls(path, detail=False)

    entries = _run(url, "list", ls)
    base = path.rstrip("/")
    return sorted({posixpath.basename(str(e).rstrip("/")) for e in entries if str(e).rstrip("/") != base} - {""})


def size(url: str) -> int:
    fs, path = _fs(url)
    return int(_run(url, "stat", fs.size, path))


def du(url: str) -> int:
    """Total bytes below a folder."""
    fs, path = _fs(url)
    return int(_run(url, "measure", lambda: fs.du(path, total=True) if fs.exists(path) else 0))


def read_bytes(url: str) -> bytes:
    """The whole object; its size is not known up front, so on S3 the per-attempt read timeouts bound it."""
    fs, path = _fs(url)
    return _run(url, "read", fs.cat_file, path, nbytes=None)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def read_json(url: str) -> Any:
    text = read_text(url)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise StorageError(f"'{url}' is not valid JSON (line {err.lineno}); the file is corrupt, rewrite it") from None
    except RecursionError:  # a crafted file of deeply nested brackets
        raise StorageError(f"'{url}' is nested too deeply to be a file mzsane wrote; it is corrupt or crafted, "
                           f"rewrite it") from None


def open_read(url: str) -> IO[bytes]:
    """A seekable binary file (pyarrow.parquet.ParquetFile accepts it)."""
    fs, path = _fs(url)
    fh = _run(url, "open", fs.open, path, "rb")
    return _ReadErrors(fh, url) if is_remote(url) else fh


class _ReadErrors:
    """A remote file whose reads fail as one-line StorageErrors too: pyarrow fetches row groups long after the
    open, so an endpoint that dies meanwhile would otherwise surface as a raw botocore error and a traceback."""

    def __init__(self, fh: Any, url: str):
        self._fh, self._url = fh, url

    def _left(self, n: int) -> int:
        """Bytes a read of ``n`` (-1: to the end) fetches at most: the hard deadline grows with them."""
        try:
            left = max(int(self._fh.size) - int(self._fh.tell()), 0)
        except (AttributeError, TypeError, ValueError):
            return max(n, 0)
        return left if n is None or n < 0 else min(n, left)

    def read(self, *args: Any) -> bytes:
        n = args[0] if args else -1
        return _run(self._url, "read", self._fh.read, *args, nbytes=self._left(n))

    def readinto(self, buffer: Any) -> int:
        return _run(self._url, "read", self._fh.readinto, buffer, nbytes=self._left(len(memoryview(buffer))))

    def seek(self, *args: Any) -> int:
        with _errors(self._url, "read"):
            return self._fh.seek(*args)

    def __getattr__(self, name: str) -> Any:  # tell, close, closed, readable, seekable, size, ...
        return getattr(self._fh, name)

    def __enter__(self) -> _ReadErrors:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._fh.close()


@contextlib.contextmanager
def open_write(url: str) -> Iterator[IO[bytes]]:
    """Yield a binary file; the object at ``url`` appears only if the block exits cleanly."""
    fs, path = _fs(url)
    if not is_remote(url):
        directory = os.path.dirname(path) or "."
        with _errors(url, "write"):
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=directory)
        try:
            try:
                with os.fdopen(fd, "wb") as fh:
                    yield fh
                    fh.flush()
                    os.fsync(fh.fileno())
                os.chmod(tmp, file_mode())  # mkstemp makes 0600; others on a shared volume must read it
                os.replace(tmp, path)
            except OSError as err:
                if is_disk_full(err):
                    raise disk_full(url) from None
                raise
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    if scheme(url) == "memory":
        buffer = _MemoryBuffer()
        yield buffer
        with _errors(url, "write"):
            fs.pipe_file(path, buffer.getvalue())
        return
    # S3: the object is only created when the (multipart) upload completes at close; on error we abort.
    fh = _run(url, "write", fs.open, path, "wb", 64 * 2**20)
    try:
        yield _BoundedWrites(fh, url)
    except BaseException as err:
        with contextlib.suppress(Exception):
            _run(url, "write", fh.discard)  # aborts a multipart upload: fails at once when the endpoint hung
        fh.closed = True  # discarded: without this its __del__ would try to upload the dropped buffer
        if _from_s3_client(err):  # a write past block_size uploads a part: the endpoint may fail right here
            raise _translate(err, url, "write") from None
        raise
    _run(url, "write", fh.close, nbytes=_buffered(fh))


def _buffered(fh: Any) -> int:
    buffer = getattr(fh, "buffer", None)
    return int(buffer.tell()) if buffer is not None else 0


class _BoundedWrites:
    """An S3 file being written whose ``write`` (which uploads a part once 64 MiB are buffered) runs under the
    hard deadline: a stopped server that no longer reads would otherwise block the upload for good."""

    def __init__(self, fh: Any, url: str):
        self._fh, self._url = fh, url

    def write(self, data: Any) -> int:
        size = len(memoryview(data)) if not isinstance(data, (bytes, bytearray)) else len(data)
        return _run(self._url, "write", self._fh.write, data, nbytes=_buffered(self._fh) + size)

    def __getattr__(self, name: str) -> Any:  # tell, flush, closed, ...
        return getattr(self._fh, name)


class _MemoryBuffer:
    def __init__(self) -> None:
        import io

        self._buf = io.BytesIO()

    def write(self, data: bytes) -> int:
        return self._buf.write(data)

    def tell(self) -> int:
        return self._buf.tell()

    def flush(self) -> None:
        pass

    def getvalue(self) -> bytes:
        return self._buf.getvalue()

    @property
    def closed(self) -> bool:
        return False


def file_mode() -> int:
    """0666 minus the process umask: what ``open()`` would have given the file (mkstemp gives 0600)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)  # no /proc: read it the only other way, and put it straight back
    os.umask(current)
    return 0o666 & ~current


def remove_stale_temps(url: str) -> list[str]:
    """Delete leftover ``.tmp-*`` files of killed writers in one local folder; returns their names.

    A file is stale when the pid in its name is no longer running (or it predates pid-named temps). Live
    writers' files are kept, so two processes writing different files of one folder do not interfere."""
    directory = local_path(url)
    if not directory or not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        if not name.startswith(TMP_PREFIX):
            continue
        pid_text = name[len(TMP_PREFIX):].split("-", 1)[0]
        if pid_text.isdigit() and _alive(int(pid_text)):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
            removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_bytes(url: str, data: bytes) -> None:
    with open_write(url) as fh:
        fh.write(data)


def write_figure(url: str, fig: Any, dpi: float | str = 110, tight: bool = False) -> str:
    """A matplotlib figure as PNG at ``url`` (atomic like every write here), then closed; returns ``url``.

    ``dpi="figure"`` keeps the figure's own resolution; ``tight`` crops the canvas to what is drawn (matplotlib's
    ``bbox_inches="tight"``), so rotated tick labels and legends are not cut off."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    plt.close(fig)
    write_bytes(url, buf.getvalue())
    return url


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def write_json(url: str, obj: Any) -> None:
    write_text(url, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def remove(url: str, recursive: bool = False) -> None:
    fs, path = _fs(url)

    def rm() -> None:
        if fs.exists(path):
            fs.rm(path, recursive=recursive)
        if recursive and scheme(url) in ("s3", "s3a"):
            _remove_folder_markers(fs, path)

    _run(url, "remove", rm)


def _remove_folder_markers(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Delete the ``folder/`` marker objects a recursive ``rm`` leaves behind, deepest first.

    Why: pyarrow's S3 filesystem (which Ray Train uploads checkpoints with) writes a marker per folder, and on
    filer-backed stores such as SeaweedFS s3fs's recursive delete removes the files but not those markers, so
    a pruned Ray checkpoint stayed listed as an empty ``checkpoint_*`` folder beside the kept ones."""
    def folders(prefix: str) -> list[str]:
        found = []
        for entry in fs.ls(prefix, detail=True, refresh=True):
            name = str(entry["name"]).rstrip("/")
            if entry.get("type") == "directory" and name != prefix:
                found += [*folders(name), name]
        return found

    if not fs.exists(path):
        return
    for folder in [*folders(path), path]:
        bucket, _, key = folder.partition("/")
        if key:
            fs.call_s3("delete_object", Bucket=bucket, Key=key.rstrip("/") + "/")


def makedirs(url: str) -> None:
    """Create a folder (no-op on object stores, where folders are prefixes)."""
    if scheme(url) == "file":
        with _errors(url, "create"):
            os.makedirs(_fs(url)[1], exist_ok=True)


def upload_dir(local_dir: str, url: str) -> None:
    """Copy a local folder to ``url``; files land one by one, so write any marker file last yourself."""
    for root, _, files in os.walk(local_dir):
        for name in sorted(files):
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            with open(src, "rb") as fh:
                write_bytes(join(url, rel), fh.read())


def download_dir(url: str, local_dir: str) -> str:
    fs, path = _fs(url)
    os.makedirs(local_dir, exist_ok=True)
    if not is_remote(url):
        with _errors(url, "download"):
            if not fs.exists(path):
                raise FileNotFoundError(path)
            shutil.copytree(path, local_dir, dirs_exist_ok=True)
        return local_dir
    found = _run(url, "download", lambda: fs.find(path, detail=True) if fs.exists(path) else None)
    if found is None:
        raise _translate(FileNotFoundError(path), url, "download")
    with _errors(url, "download"):
        for src, info in found.items():
            rel = posixpath.relpath(src, path)
            # object stores may hold the prefix itself or "folder/" marker objects (Ray writes them)
            if rel in (".", "") or info.get("type") == "directory" or src.endswith("/"):
                continue
            dst = os.path.join(local_dir, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(dst, "wb") as fh:
                fh.write(fs.cat_file(src))
    return local_dir


def pyarrow_fs(url: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path) for pyarrow datasets and Ray's RunConfig(storage_filesystem=...)."""
    import pyarrow.fs as pafs

    kind = scheme(url)
    if kind == "file":
        return pafs.LocalFileSystem(), _fs(url)[1]
    if kind in ("s3", "s3a"):
        ep = endpoint()
        connect_s, read_s = _attempt_timeouts()
        # Ray Train uploads checkpoints through this one: bounded like s3fs (attempts x request timeout)
        kwargs: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                                  "connect_timeout": connect_s, "request_timeout": read_s,
                                  "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=_ATTEMPTS**2 - 1)}
        if ep:
            kwargs["endpoint_override"] = ep.split("://", 1)[-1]
            kwargs["scheme"] = ep.split("://", 1)[0] if "://" in ep else "https"
        if os.environ.get("AWS_ACCESS_KEY_ID"):
            kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
            kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        else:
            _require_credentials()
        return pafs.S3FileSystem(**kwargs), url.split("://", 1)[1].rstrip("/")
    if kind == "memory":
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, path = _fs(url)
        return PyFileSystem(FSSpecHandler(fs)), path
    raise StorageError(f"unsupported storage URL '{url}'; use a local path, s3://bucket/prefix or memory://prefix")


def check_writable(url: str) -> None:
    """Fail fast, with one line, when ``url`` cannot be written (bad endpoint, credentials, permissions)."""
    probe = join(url, f".mzsane-probe-{uuid.uuid4().hex[:8]}")
    write_bytes(probe, b"ok")
    remove(probe)
