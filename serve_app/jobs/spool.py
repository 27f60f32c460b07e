"""Spooling a multipart upload of many files straight into a job's ``inputs/`` folder.

The body is parsed as it streams (python-multipart's push parser): each file part is
written to its own file under a safe name as its bytes arrive, so memory holds one network
chunk at a time however many files are sent. Non-file fields (options, priority) are kept,
small. Limits are checked while streaming: the number of files, each file's size, each
field's size.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from serve_app.errors import InvalidRequest, PayloadTooLarge
from serve_app.jobs.naming import spool_name

LOGGER = logging.getLogger(__name__)
FILE_FIELDS = frozenset({"files", "file"})
MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 64
SPACE_CHECK_BYTES = 8 * 1024 * 1024


@dataclass
class Spooled:
    files: list[tuple[Path, str]] = field(default_factory=list)  # (path, client's filename)
    fields: dict[str, str] = field(default_factory=dict)
    bytes: int = 0


class _Part:
    def __init__(self) -> None:
        self.disposition = b""
        self.name = ""
        self.filename: str | None = None
        self.data = bytearray()
        self.file: IO[bytes] | None = None
        self.size = 0


class UploadSpooler:
    def __init__(
        self,
        folder: Path,
        *,
        max_files: int,
        max_file_bytes: int,
        check_space: Callable[[int], None] | None = None,
    ) -> None:
        self.folder = folder
        self.check_space = check_space
        self._checked_at = -SPACE_CHECK_BYTES
        self.max_files = max_files
        self.max_file_bytes = max_file_bytes
        self.result = Spooled()
        self._part = _Part()
        self._header_name = b""
        self._header_value = b""
        self._writes: list[tuple[IO[bytes], bytes]] = []
        self._closing: list[IO[bytes]] = []
        self._open: list[IO[bytes]] = []

    # ---------------------------------------------------------------- parser callbacks

    def _on_part_begin(self) -> None:
        self._part = _Part()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._part.disposition = self._header_value
        self._header_name = self._header_value = b""

    def _on_headers_finished(self) -> None:
        part = self._part
        _, params = parse_options_header(part.disposition)
        if b"name" not in params:
            raise InvalidRequest("a multipart part has no name", code="invalid_multipart")
        part.name = params[b"name"].decode("utf-8", "replace")
        if b"filename" not in params:
            if len(self.result.fields) >= MAX_FIELDS:
                raise InvalidRequest("too many form fields", code="invalid_multipart")
            return
        if part.name not in FILE_FIELDS:
            raise InvalidRequest(
                f"file part {part.name!r}: send files in the 'files' field", code="invalid_multipart"
            )
        index = len(self.result.files)
        if index >= self.max_files:
            raise PayloadTooLarge(
                f"too many files: at most {self.max_files} in one upload",
                code="too_many_files",
                max_files=self.max_files,
            )
        part.filename = params[b"filename"].decode("utf-8", "replace")
        path = self.folder / spool_name(index, part.filename)
        part.file = open(path, "wb")  # noqa: SIM115 - closed at part end or on error
        self._open.append(part.file)
        self.result.files.append((path, part.filename))

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        chunk = data[start:end]
        part.size += len(chunk)
        if part.file is None:
            if part.size > MAX_FIELD_BYTES:
                raise PayloadTooLarge(f"form field {part.name!r} is too large", code="field_too_large")
            part.data.extend(chunk)
            return
        if part.size > self.max_file_bytes:
            raise PayloadTooLarge(
                f"{part.filename!r} is larger than {self.max_file_bytes} bytes",
                code="file_too_large",
                max_bytes=self.max_file_bytes,
            )
        self._writes.append((part.file, chunk))
        self.result.bytes += len(chunk)

    def _on_part_end(self) -> None:
        part = self._part
        if part.file is None:
            self.result.fields[part.name] = part.data.decode("utf-8", "replace")
        else:
            self._closing.append(part.file)

    # ---------------------------------------------------------------- driving

    def _flush(self) -> None:
        # The free-space floor, every SPACE_CHECK_BYTES written (raises 507).
        if self.check_space and self.result.bytes - self._checked_at >= SPACE_CHECK_BYTES:
            self._checked_at = self.result.bytes
            self.check_space(self.result.bytes)
        for f, chunk in self._writes:
            f.write(chunk)
        for f in self._closing:
            f.close()
        self._writes.clear()
        self._closing.clear()

    async def spool(self, content_type: str, stream: AsyncIterator[bytes]) -> Spooled:
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise InvalidRequest("multipart body without a boundary", code="invalid_multipart")
        try:
            # The parser refuses some boundaries itself (over 256 bytes): a client's error.
            parser = MultipartParser(boundary, self._callbacks())
        except FormParserError as exc:
            raise _bad_multipart(exc) from None
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            async for chunk in stream:
                try:
                    parser.write(chunk)
                except (InvalidRequest, PayloadTooLarge):
                    raise
                except Exception as exc:
                    raise _bad_multipart(exc) from None
                if self._writes or self._closing:
                    await asyncio.to_thread(self._flush)
            parser.finalize()
        finally:
            for f in self._open:
                f.close()
        return self.result

    def _callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._on_part_begin,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
        }


def _bad_multipart(exc: Exception) -> InvalidRequest:
    # The parser's own words stay in the log: answers carry the server's messages only.
    LOGGER.info("multipart upload refused: %s", exc)
    return InvalidRequest("the multipart body is malformed", code="invalid_multipart")
