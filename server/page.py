"""The web page at `/`: static HTML, CSS and JavaScript from server/static, with a strict Content-Security-Policy."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC = Path(__file__).with_name("static")
# Same-origin only, no inline script or style; blob: for the photo previews made in the browser.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class SecureStaticFiles(StaticFiles):
    """StaticFiles with the page's security headers on every file."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers=HEADERS)


ROUTES = [
    Route("/", index, methods=["GET"]),
    Mount("/static", app=SecureStaticFiles(directory=STATIC), name="static"),
]
