"""The page for people: ``GET /`` (one static HTML file) and its script, style and samples under ``/static``.

Never behind the API key: the files are static; the API calls the page makes send the key the user typed in.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["STATIC", "mount_static", "router"]

STATIC = Path(__file__).resolve().parents[1] / "static"
# Everything the page loads comes from this server: no CDN, no external font, no inline script or style.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["page"])


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The detection page (HTML; it calls /v1/model and /v1/detect)."""
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=_HEADERS)


def mount_static(app: FastAPI) -> None:
    """Serve ``service/static`` (page script, style, samples) under ``/static``."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
