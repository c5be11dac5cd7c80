"""The page's HTTP side: a WSGI app mounted at /monitor on the metrics server.

  GET  /monitor/                 the page (static/index.html; uPlot vendored beside it)
  GET  /monitor/state.json       MonitorState.snapshot(), polled by the page every refresh_s
  GET  /monitor/hit/ID.png       a latest hit, panels tiled, log-scaled gray
  GET  /monitor/powder.png?run=K the virtual powder of run K (default: the current run)
  POST /monitor/reset            forget the accumulated views
"""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs

from .state import MonitorState

PREFIX = "/monitor"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".LICENSE": "text/plain; charset=utf-8"}
_HIT = re.compile(r"^/hit/(\d+)\.png$")


def _static_files() -> dict[str, bytes]:
    """The static folder, read once: names are the only paths served (no traversal)."""
    folder = resources.files(__package__) / "static"
    return {f.name: f.read_bytes() for f in folder.iterdir()
            if f.is_file() and any(f.name.endswith(ext) for ext in _TYPES)}


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def monitor_app(state: MonitorState) -> Callable:
    """A WSGI app serving PREFIX and everything under it (see the module docstring)."""
    static = _static_files()

    def reply(start_response: Callable, status: str, body: bytes, ctype: str,
              extra: tuple = ()) -> list[bytes]:
        start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body))),
                                ("Cache-Control", "no-store"), *extra])
        return [body]

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")[len(PREFIX):]
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "":
            return reply(start_response, "302 Found", b"", "text/plain", (("Location", PREFIX + "/"),))
        if path == "/reset":
            if method != "POST":
                return reply(start_response, "405 Method Not Allowed", b"POST only\n", "text/plain",
                             (("Allow", "POST"),))
            state.reset()
            return reply(start_response, "200 OK", b'{"reset": true}', "application/json")
        if method not in ("GET", "HEAD"):
            return reply(start_response, "405 Method Not Allowed", b"GET only\n", "text/plain", (("Allow", "GET"),))
        if path == "/":
            return reply(start_response, "200 OK", static["index.html"], _TYPES[".html"])
        if path == "/state.json":
            body = json.dumps(state.snapshot(), default=_json_default, separators=(",", ":")).encode()
            return reply(start_response, "200 OK", body, "application/json")
        if path.startswith("/static/") and path[len("/static/"):] in static:
            name = path[len("/static/"):]
            ctype = next(t for ext, t in _TYPES.items() if name.endswith(ext))
            return reply(start_response, "200 OK", static[name], ctype)
        png = None
        if (m := _HIT.match(path)) is not None:
            png = state.hit_png(int(m.group(1)))
        elif path == "/powder.png":
            run = parse_qs(environ.get("QUERY_STRING", "")).get("run", [None])[0]
            png = state.powder_png(run)
        if png is not None:
            return reply(start_response, "200 OK", png, "image/png")
        return reply(start_response, "404 Not Found", b"not found\n", "text/plain")

    return app
