"""The web page at `/`: static HTML, CSS and JavaScript from server/static, with a strict Content-Security-Policy."""

from __future__ import annotations

from html import escape
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from server.config import Settings

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


def photo_policy(settings: Settings) -> str:
    """What happens to the photos people send, under the running configuration: the page's footer says it."""
    kept = []
    if settings.feedback_images:
        kept.append(f"each photo is kept for {settings.feedback_images_days} days, and longer once someone says "
                    "whether its answer was right, so that corrected answers can teach the next model")  # fmt: skip
    if settings.prediction_log and settings.prediction_log_sample_every:
        every = settings.prediction_log_sample_every
        which = "every photo" if every == 1 else f"one photo in {every}"
        kept.append(f"{which} is kept to monitor the service")
    if not kept:
        return "Photos are classified by this service and not stored."
    return f"Photos are classified by this service; {'; '.join(kept)}."


def render(settings: Settings) -> str:
    """The page's HTML under these settings: made once, when the application is (app.state.page)."""
    return (STATIC / "index.html").read_text().replace("PHOTO_POLICY", escape(photo_policy(settings)))


async def index(request: Request) -> Response:
    return HTMLResponse(request.app.state.page, headers=HEADERS)


ROUTES = [
    Route("/", index, methods=["GET"]),
    Mount("/static", app=SecureStaticFiles(directory=STATIC), name="static"),
]
