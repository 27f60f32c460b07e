"""The one gate for every path and URI a job reads or writes, and every URL it calls.

Accepted forms, nothing else (every refusal a JSON 400 before a job exists):

- **local**: an absolute path, or ``file:///absolute/path`` (the same thing, spelled as a URI);
  no ``..`` components, no NUL or control characters. After resolving symlinks the path must
  lie inside a configured root: inputs in ``<data_dir>/inputs``, ``jobs.local_roots`` and
  ``jobs.storage.input_roots``; outputs in ``<data_dir>/outputs``, ``jobs.local_roots`` and
  ``jobs.storage.output_roots``, or the job's own folder (the default). The jobs folder
  (``<data_dir>/jobs``, every job's uploads and outputs) is never an input, and never an output
  but for the job's own folder.
- **s3://bucket/key**, **gs://bucket/key**: inputs and outputs, inside one of the configured
  ``jobs.storage.input_buckets`` / ``output_buckets`` prefixes (none by default).
- **http(s)://host[:port]/path**: inputs only (and job callbacks). A well-formed host (an IP
  literal or DNS name of labels up to 63 characters), a port in 1..65535, no credentials; every
  address the host resolves to must be global unless ``jobs.allow_private_urls``.

Refused on purpose: chained URLs (``dir::file://...``, ``simplecache::s3://...``), fsspec's
aliases and other protocols (``local://``, ``memory://``, ``gcs://``, ``s3a://``, ``ftp://``,
``sftp://``, ...), relative paths, ``~``. Validating never connects anywhere: the only
network use is a DNS lookup of an http(s) host, to check its addresses. Requests go to the
address that was checked (``Gate.pin``), not to a second lookup's answer.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from serve_app.config import AppConfig
from serve_app.errors import InvalidRequest, Overloaded

Protocol = Literal["file", "s3", "gs", "http", "https"]
MAX_URI = 4096
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,62}")


class PrivateAddress(InvalidRequest):
    default_code = "private_address"


class ForbiddenPath(InvalidRequest):
    default_code = "forbidden_path"


class InvalidUri(InvalidRequest):
    default_code = "invalid_uri"


class HostUnresolved(Overloaded):
    """The host does not resolve now (transient: a job's fetch retries)."""

    default_code = "source_unavailable"


@dataclass(frozen=True)
class Location:
    """A checked place: ``uri`` is what storage and fetching use (for local places, the
    resolved absolute path)."""

    protocol: Protocol
    uri: str

    @property
    def local(self) -> bool:
        return self.protocol == "file"

    @property
    def path(self) -> Path:
        return Path(self.uri)

    def overlaps(self, other: Location) -> bool:
        """Whether one contains the other (two jobs writing there could collide)."""
        if self.local != other.local:
            return False
        if self.local:
            return self.path.is_relative_to(other.path) or other.path.is_relative_to(self.path)
        a, b = self.uri.rstrip("/") + "/", other.uri.rstrip("/") + "/"
        return a.startswith(b) or b.startswith(a)


def protocol_of(uri: str) -> str:
    """``file`` for paths and ``file://``; otherwise the scheme, lower-cased (``local``,
    fsspec's alias, stays ``local`` and is refused)."""
    m = _SCHEME.match(uri)
    if m is None:
        return "file"
    scheme = m.group(1).lower()
    return scheme


@dataclass(frozen=True)
class Pinned:
    """An http(s) request's target after ``Gate.pin``: the URL with a checked address as its
    host, and the header and TLS name that keep the original host."""

    url: str
    headers: dict[str, str]
    extensions: dict[str, Any]


class Gate:
    """The checks of one server configuration (cheap to build; holds resolved roots)."""

    def __init__(self, config: AppConfig) -> None:
        jobs = config.jobs
        data = Path(jobs.data_dir).expanduser()
        self.jobs_dir = _resolved(data / "jobs")
        shared = tuple(jobs.local_roots)
        self.input_roots = [_resolved(p) for p in (data / "inputs", *shared,
                                                   *jobs.storage.input_roots)]
        self.output_roots = [_resolved(p) for p in (data / "outputs", *shared,
                                                    *jobs.storage.output_roots)]
        self.input_buckets = tuple(jobs.storage.input_buckets)
        self.output_buckets = tuple(jobs.storage.output_buckets)
        self.allow_private = jobs.allow_private_urls

    # ------------------------------------------------------------------ the checks

    def input(self, uri: object) -> Location:
        """Where an input (or an ``input_prefix``) may be read from."""
        text = _text(uri, "input")
        protocol = protocol_of(text)
        if protocol in ("http", "https"):
            return Location(protocol, self.url(text))  # type: ignore[arg-type]
        if protocol == "file":
            path = self._local(text)
            if path.is_relative_to(self.jobs_dir) or not _within(path, self.input_roots):
                raise ForbiddenPath("the input is outside the folders this server reads jobs from")
            return Location("file", str(path))
        if protocol in ("s3", "gs"):
            return Location(protocol, _bucket_uri(text, self.input_buckets, "read"))
        raise InvalidUri(f"{protocol}:// inputs are not accepted; use a path, s3://, gs:// "
                         "or http(s)://")

    def output(self, uri: object, own_folder: Path, namespace: str | None = None) -> Location:
        """Where a job's outputs may go; ``None`` or ``""``: its own folder.

        ``namespace`` (a user key's name) keeps the key in its own folder of each shared
        root and bucket prefix: ``<root>/<rest>`` becomes ``<root>/<namespace>/<rest>``
        (unchanged when ``rest`` already starts there), and a relative path is taken under
        the first output root (``<data_dir>/outputs/<namespace>/<path>``). Without it (an
        admin key, a handle, keys off) any allowed place is taken as written."""
        if uri is None or uri == "":
            return Location("file", str(_resolved(own_folder)))
        text = _text(uri, "output")
        protocol = protocol_of(text)
        if protocol == "file":
            relative = namespace is not None and not text.lower().startswith(("/", "file:"))
            path = self._local(str(self.output_roots[0] / text) if relative else text)
            own = _resolved(own_folder)
            if path.is_relative_to(own):
                return Location("file", str(path))
            if path.is_relative_to(self.jobs_dir) or not _within(path, self.output_roots):
                raise ForbiddenPath("the output is outside the folders this server writes to")
            if namespace is not None:
                path = self._namespaced(path, namespace)
            return Location("file", str(path))
        if protocol in ("s3", "gs"):
            uri = _bucket_uri(text, self.output_buckets, "write")
            if namespace is not None:
                uri = _bucket_namespaced(uri, self.output_buckets, namespace)
            return Location(protocol, uri)
        raise InvalidUri(f"{protocol}:// outputs are not accepted; use a path, s3:// or gs://",
                         code="invalid_output")

    def _namespaced(self, path: Path, namespace: str) -> Path:
        """``path`` moved into ``namespace``'s folder of the (innermost) root holding it."""
        root = max((r for r in self.output_roots if path.is_relative_to(r)),
                   key=lambda r: len(r.parts))
        rest = path.relative_to(root).parts
        if rest[:1] == (namespace,):
            return path
        home = _resolved(root / namespace)
        moved = _resolved(home.joinpath(*rest))
        # A symlink on the way must not lead out of the key's folder or the roots.
        if (not moved.is_relative_to(home) or moved.is_relative_to(self.jobs_dir)
                or not _within(moved, self.output_roots)):
            raise ForbiddenPath("the output is outside the folders this server writes to")
        return moved

    def url(self, url: object, *, resolve: bool = True) -> str:
        """An http(s) URL that is well formed and (``resolve``) reaches only allowed
        addresses; raises ``HostUnresolved`` when its host does not resolve now."""
        text = _text(url, "URL")
        host, port = parse_url(text)
        if resolve:
            resolve_host(host, port, self.allow_private)
        return text

    def pin(self, url: str) -> Pinned:
        """Check ``url`` and name the address to connect to: the request goes to an address
        the check looked at (no DNS rebinding between the check and the connection), with the
        original ``Host`` header and TLS server name."""
        text = _text(url, "URL")
        host, port = parse_url(text)
        address = resolve_host(host, port, self.allow_private)[0]
        parts = urlsplit(text)
        literal = f"[{address}]" if ":" in address else address
        netloc = literal + (f":{parts.port}" if parts.port is not None else "")
        return Pinned(urlunsplit(parts._replace(netloc=netloc)), {"Host": parts.netloc},
                      {"sni_hostname": host})

    def _local(self, text: str) -> Path:
        if text.lower().startswith("file://"):
            rest = text[len("file://"):]
            if not rest.startswith("/"):  # file://host/... names another machine
                raise InvalidUri("a file:// URI must be file:///absolute/path")
            text = rest
        if "::" in text:
            raise InvalidUri("chained URIs are not accepted")
        path = PurePosixPath(text)
        if not path.is_absolute():
            raise InvalidUri("a local path must be absolute")
        if ".." in path.parts:
            raise ForbiddenPath("'..' is not accepted in paths")
        return _resolved(Path(text))


# ---------------------------------------------------------------------- pieces


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidUri(f"the {what} must be a non-empty string")
    if len(value) > MAX_URI:
        raise InvalidUri(f"the {what} is longer than {MAX_URI} characters")
    if _CONTROL.search(value):
        raise InvalidUri(f"the {what} holds NUL or control characters")
    return value


def _resolved(path: Path) -> Path:
    return Path(path).expanduser().resolve()


def _within(path: Path, roots: list[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def _bucket_uri(text: str, allowed: tuple[str, ...], verb: str) -> str:
    scheme, _, rest = text.partition("://")
    if "::" in text or "?" in text or "#" in text:
        raise InvalidUri("chained URIs, queries and fragments are not accepted")
    bucket, _, key = rest.partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise InvalidUri("not a valid bucket name")
    if any(part in ("..", ".") for part in key.split("/")):
        raise ForbiddenPath("'..' and '.' are not accepted in object keys")
    uri = f"{scheme.lower()}://{rest}"
    for entry in allowed:
        base = entry.rstrip("/")
        if uri.rstrip("/") == base or uri.startswith(base + "/"):
            return uri
    raise ForbiddenPath(f"this server does not {verb} that bucket or prefix")


def _bucket_namespaced(uri: str, allowed: tuple[str, ...], namespace: str) -> str:
    """``uri`` (allowed by an entry) moved into ``namespace``'s prefix of the longest entry."""
    base = max((e.rstrip("/") for e in allowed
                if uri.rstrip("/") == e.rstrip("/") or uri.startswith(e.rstrip("/") + "/")),
               key=len)
    rest = uri.rstrip("/")[len(base):].lstrip("/")
    if rest.split("/", 1)[0] == namespace:
        return uri
    return f"{base}/{namespace}" + (f"/{rest}" if rest else "")


def parse_url(url: str) -> tuple[str, int]:
    """``(host, port)`` of a well-formed http(s) URL; ``InvalidUri`` (400) otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidUri("malformed URL (host or port)") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidUri("not an http(s) URL")
    if parts.username is not None or parts.password is not None:
        raise InvalidUri("credentials in URLs are not accepted")
    host = parts.hostname
    if not host:
        raise InvalidUri("the URL has no host")
    if port is not None and not 1 <= port <= 65535:
        raise InvalidUri("the URL's port must be in 1..65535")
    _check_host(host, bracketed="[" in parts.netloc)
    return host, port or (443 if parts.scheme.lower() == "https" else 80)


def _check_host(host: str, bracketed: bool) -> None:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        ip = None
    if bracketed and not isinstance(ip, ipaddress.IPv6Address):
        raise InvalidUri("malformed IPv6 literal")
    if ip is not None:
        return
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise InvalidUri("malformed host name") from None
    labels = ascii_host.rstrip(".").split(".")
    if len(ascii_host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise InvalidUri("malformed host name (labels are 1-63 letters, digits or '-')")


def check_address(address: str, allow_private: bool) -> None:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if allow_private or (ip.is_global and not ip.is_multicast):
        return
    raise PrivateAddress(
        "refusing to connect to a private, loopback, link-local or reserved address"
    )


def resolve_host(host: str, port: int, allow_private: bool) -> list[str]:
    """Every address ``host`` resolves to, each checked; raises ``PrivateAddress``."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise HostUnresolved(f"cannot resolve {host!r}: {exc}") from None
    addresses = sorted({str(info[4][0]) for info in infos})
    for address in addresses:
        check_address(address, allow_private)
    return addresses
