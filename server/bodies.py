"""Request bodies: the declared media type, the body read under a byte limit and a deadline, and uploaded images.

A body holds what it has sent (counted against MAX_ADMITTED_BYTES) and only until its deadline: a client that sends
a byte every few seconds is answered 408 and closed, as by Apache's mod_reqtimeout (a timeout between reads alone,
like nginx's client_body_timeout, would let it hold on forever).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Mapping

from multipart import MultipartError, MultipartSegment, PushMultipartParser, parse_options_header
from starlette.requests import Request

from server.admission import refuse_early
from server.errors import BodyTimeout, ClientClosed, ClientError

MAX_FIELD_BYTES = 1024 * 1024  # a form field that is not a file (Starlette's max_part_size)


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
        try:
            async with asyncio.timeout(started + allowed - time.monotonic()):  # a third of anyio's cost
                message = await request.receive()
        except TimeoutError:
            raise BodyTimeout(f"the body did not arrive in time: {received} bytes in {allowed:g} s") from None
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


class UploadParser:
    """multipart/form-data through the `multipart` package's push parser (a part's headers are found with
    bytes.find, where python-multipart read them a byte at a time: 14 against 59 us for a 27 KB photo), the file
    parts named `field` kept as bytes in memory: they are counted against MAX_ADMITTED_BYTES as they arrive and become
    the image bytes anyway, so nothing is spooled to a temporary file (a full disk cannot fail an upload) and no part
    is copied twice. Limits as Starlette's MultiPartParser: `file_limit` file parts of any name (the one over it stops
    the parse: 413), `field_limit` other fields of at most MAX_FIELD_BYTES each, and every part needs a name (400);
    the parser's own bounds on a part's headers (8 of at most 4 KB each) stand."""

    def __init__(self, content_type: str, field: str, file_limit: int, field_limit: int = 16) -> None:
        boundary = parse_options_header(content_type)[1].get("boundary")
        if not boundary:
            raise ClientError(400, "invalid_multipart", "the multipart body has no boundary")
        self.field, self.file_limit, self.field_limit = field, file_limit, field_limit
        self.files = self.fields = 0
        self.uploads: list[tuple[str, bytes]] = []
        self.part: MultipartSegment | None = None  # the part being read
        self.keep = False  # whether the part being read is one of the uploads
        self.chunks: list[bytes] = []
        try:
            self.parser = PushMultipartParser(boundary)
        except MultipartError as error:
            raise ClientError(400, "invalid_multipart", f"invalid multipart data: {error}") from None

    def begin(self, part: MultipartSegment) -> None:
        if not part.name:
            raise ClientError(400, "invalid_multipart", "a part's Content-Disposition has no name")
        if part.filename is not None:
            self.files += 1
            if self.files > self.file_limit:
                raise ClientError(413, "too_many_files", f"at most {self.file_limit} files per request")
        else:
            self.fields += 1
            if self.fields > self.field_limit:
                raise ClientError(400, "invalid_multipart", f"more than {self.field_limit} form fields")
        self.part, self.keep, self.chunks = part, part.name == self.field and part.filename is not None, []

    def data(self, chunk: bytes) -> None:
        assert self.part is not None
        if self.part.filename is None and self.part.bytes_received > MAX_FIELD_BYTES:
            raise ClientError(400, "invalid_multipart", f"a form field is over {MAX_FIELD_BYTES} bytes")
        if self.keep:
            self.chunks.append(chunk)

    def end(self) -> None:
        assert self.part is not None
        if self.keep:
            self.uploads.append((self.part.filename or f"{self.field}[{len(self.uploads)}]", b"".join(self.chunks)))
        self.part, self.keep, self.chunks = None, False, []

    def write(self, chunk: bytes) -> None:
        """Parse the next chunk of the body; b"" ends it."""
        try:
            for event in self.parser.parse(chunk):
                if isinstance(event, MultipartSegment):
                    self.begin(event)
                elif event is None:
                    self.end()
                else:
                    self.data(event)
        except MultipartError as error:
            raise ClientError(400, "invalid_multipart", f"invalid multipart data: {error}") from None

    def finish(self) -> list[tuple[str, bytes]]:
        self.write(b"")
        if not self.uploads:
            raise ClientError(422, "missing_file", f"the form has no file in field '{self.field}'")
        return self.uploads


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
    parser = UploadParser(request.headers["content-type"], field, file_limit=max_files)
    async for chunk in body:
        parser.write(chunk)
    return parser.finish()
