"""Request bodies: the declared media type, the body read under a byte limit, and uploaded images.

An inference request is admitted (server.admission) before any of its body is read: a waiting request holds its
body, so the bound on admitted requests is also the bound on the bodies held.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from server.admission import admit
from server.errors import ClientError


def media_type(headers: Mapping[str, str]) -> str:
    """The Content-Type without its parameters, lower case ('' when there is none)."""
    return headers.get("content-type", "").split(";")[0].strip().lower()


async def limited_stream(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The raw body, refused with 413 as soon as it grows past the limit (nothing beyond it is buffered)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ClientError(413, "payload_too_large", f"the body is {declared} bytes; the limit is {limit}")
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise ClientError(413, "payload_too_large", f"the body exceeds the {limit} byte limit")
        yield chunk


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, at most `limit` bytes (413 past it)."""
    return b"".join([chunk async for chunk in limited_stream(request, limit)])


class TooManyFiles(Exception):
    """More file parts than the request may carry."""


class UploadParser(MultiPartParser):
    """Starlette's multipart parser that counts the file parts itself and stops at the first one too many."""

    def __init__(self, *args: Any, file_limit: int, **kwargs: Any) -> None:
        super().__init__(*args, max_files=math.inf, **kwargs)
        self.file_limit = file_limit

    def on_part_end(self) -> None:
        super().on_part_end()
        if sum(isinstance(value, UploadFile) for _, value in self.items) > self.file_limit:
            raise TooManyFiles


async def read_uploads(request: Request, field: str, max_files: int) -> list[tuple[str, bytes]]:
    """(filename, bytes) of each uploaded image: multipart parts named `field`, or a raw image/* body.
    The request is admitted before any of its body is read."""
    declared = media_type(request.headers)
    if not declared.startswith("image/") and declared != "multipart/form-data":
        raise ClientError(
            415, "unsupported_media_type", f"send multipart/form-data with a '{field}' field, or an image/* body"
        )
    await admit(request)
    body = limited_stream(request, request.app.state.settings.max_upload_bytes)
    if declared.startswith("image/"):
        return [("body", b"".join([chunk async for chunk in body]))]
    parser = UploadParser(request.headers, body, file_limit=max_files, max_fields=16)
    try:
        form = await parser.parse()
    except TooManyFiles:
        raise ClientError(413, "too_many_files", f"at most {max_files} files per request") from None
    except MultiPartException as error:
        raise ClientError(400, "invalid_multipart", str(error)) from None
    try:
        parts = [part for part in form.getlist(field) if isinstance(part, UploadFile)]
        if not parts:
            raise ClientError(422, "missing_file", f"the form has no file in field '{field}'")
        return [(part.filename or f"{field}[{i}]", await part.read()) for i, part in enumerate(parts)]
    finally:
        await form.close()
