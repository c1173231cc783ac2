"""Request bodies: the declared media type, the body read under a byte limit and a deadline, and uploaded images.

A body holds what it has sent (counted against MAX_ADMITTED_BYTES) and only until its deadline: a client that sends
a byte every few seconds is answered 408 and closed, as by Apache's mod_reqtimeout (a timeout between reads alone,
like nginx's client_body_timeout, would let it hold on forever).
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import anyio
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from server.admission import refuse_early
from server.errors import BodyTimeout, ClientClosed, ClientError


def media_type(headers: Mapping[str, str]) -> str:
    """The Content-Type without its parameters, lower case ('' when there is none)."""
    return headers.get("content-type", "").split(";")[0].strip().lower()


def body_deadline(received: int, timeout: float, max_timeout: float, min_rate: float) -> float:
    """Seconds a body may take once `received` bytes have arrived: `timeout`, one more second for every `min_rate`
    bytes, at most `max_timeout` (Apache's RequestReadTimeout body=20-60,MinRate=500 with the defaults)."""
    return min(timeout + received / min_rate, max_timeout)


async def limited_stream(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The raw body as it arrives: 413 past `limit` bytes (nothing beyond it is buffered), 408 when it takes longer
    than its deadline (BODY_TIMEOUT, extended by READ_MIN_RATE, at most BODY_TIMEOUT_MAX), 499 when the client hangs
    up; every chunk is held against MAX_ADMITTED_BYTES (server.admission) until the request ends."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise ClientError(413, "payload_too_large", f"the body is {declared} bytes; the limit is {limit}")
    settings = request.app.state.settings
    admission = request.app.state.admission
    started, received = time.monotonic(), 0
    while True:
        allowed = body_deadline(received, settings.body_timeout, settings.body_timeout_max, settings.read_min_rate)
        with anyio.move_on_after(started + allowed - time.monotonic()) as waiting:
            message = await request.receive()
        if waiting.cancelled_caught:
            raise BodyTimeout(f"the body did not arrive in time: {received} bytes in {allowed:g} s")
        if message["type"] == "http.disconnect":
            raise ClientClosed
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > limit:
            raise ClientError(413, "payload_too_large", f"the body exceeds the {limit} byte limit")
        if chunk:
            admission.hold(request.scope, len(chunk))
            yield chunk
        if not message.get("more_body", False):
            return


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, at most `limit` bytes (as limited_stream)."""
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
    Refused at once when every inference place is taken; admitted for inference only once the body is here."""
    declared = media_type(request.headers)
    if not declared.startswith("image/") and declared != "multipart/form-data":
        raise ClientError(
            415, "unsupported_media_type", f"send multipart/form-data with a '{field}' field, or an image/* body"
        )
    await refuse_early(request)
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
