"""The operator console: a few static files served under `/ui` by the gateway's HTTP port.

The page calls only the public REST API (the same routes curl uses), so it needs nothing from the
server beyond these files; the gateway hands `Console` the requests under `/ui`.
See docs/CONSOLE.md.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).resolve().parent / "static"
PREFIX = "/ui"

# The page loads nothing from elsewhere and runs no inline script, so a strict policy costs
# nothing and turns an injected <script> or a framing attempt into a no-op.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files, and an operator who upgrades the server must get the matching page at once.
    "Cache-Control": "no-cache",
}


def _content_type(name: str) -> str:
    if name.endswith(".js"):
        return "text/javascript"  # mimetypes may not know it on a minimal system; modules need it
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _load_files() -> dict[str, tuple[bytes, str]]:
    """Every file of the page, read once: a fixed set, so no request path ever reaches the disk."""
    return {
        path.name: (path.read_bytes(), _content_type(path.name))
        for path in sorted(STATIC_DIR.iterdir())
        if path.is_file()
    }


class Console:
    """Answers every path under `/ui`: GET `/ui` redirects to `/ui/` (the page), `/ui/<file>` is one
    of its files. The gateway hands it the requests no API route takes (docs/CONSOLE.md)."""

    def __init__(self) -> None:
        self._files = _load_files()

    @staticmethod
    def owns(path: str) -> bool:
        return path == PREFIX or path.startswith(PREFIX + "/")

    def answer(self, path: str) -> web.Response:
        """The answer for `path` (decoded, under `/ui`). Answers are returned, never raised: the
        gateway turns a raised HTTPException into its JSON error shape, which would drop the
        Location header."""
        if path == PREFIX:
            # Relative module and style URLs in the page resolve against /ui/, not /.
            return web.Response(status=301, headers={"Location": f"{PREFIX}/"})
        name = path[len(PREFIX) + 1 :] or "index.html"
        found = self._files.get(name)
        if found is None:
            return web.Response(status=404, text=f"no file {name!r} in the console")
        body, content_type = found
        return web.Response(body=body, content_type=content_type, headers=_SECURITY_HEADERS)
