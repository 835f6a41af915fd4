"""``simple-dit serve``: a local web page to sample a trained run and read its training record.

    simple-dit serve runs/mini                # then open http://127.0.0.1:8000/
    simple-dit serve                          # the model shipped in the package
    simple-dit serve runs/compare --port 0    # a `simple-dit compare` directory: its report

Pointed at a run directory, the page picks the classes, images per class, sampler, steps,
guidance and seed, shows the denoising frame by frame while the server computes it, then the final
images; below, the run's training curves (metrics.jsonl) and evaluation scores (its ``eval_*``
records and guidance.json). Pointed at a ``simple-dit compare`` directory (report.html and
results.json) it shows that report.

The server is the standard library's ``ThreadingHTTPServer``, so the page needs no extra: one
model answers one request at a time anyway (a lock around sampling), and a streamed response is a
handler writing Server-Sent Events to its socket. An async framework (FastAPI with uvicorn, a
dozen packages) would add nothing here but weight. The page is one HTML file, a script and a
style sheet in ``simple_dit/static`` with no framework; it draws its charts as SVG.

Endpoints (errors are ``{"error": "..."}`` with a 4xx status):

    GET  /                the page (for a compare directory: its report.html)
    GET  /static/NAME     the page's script and style sheet
    GET  /files/PATH      a file of the served directory (images, JSON, reports); nothing outside it
    GET  /api/info        the model: classes, samplers and their default steps, guidance, limits
    GET  /api/run         training curves, evaluation records and guidance.json of the run
    POST /api/generate    {"classes": [3, 7], "per_class": 4, "sampler": "euler", "steps": 20,
                          "guidance": 3, "seed": 0} (all but "classes" optional) answered with
                          text/event-stream: one "start" event (the settings used), "frame"
                          events (a PNG data URI of the batch as it denoises), then "done" (each
                          image as a PNG data URI with its label) or "error".

Limits: at most MAX_IMAGES images and MAX_STEPS steps a request, guidance in [0, MAX_GUIDANCE],
a seed in [0, 2**32), classes within the model's; at most MAX_WAITING requests queue for the model
(more get 503).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import io
import json
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .errors import UserError

MAX_IMAGES = 100
MAX_STEPS = 200
MAX_GUIDANCE = 20.0
MAX_SEED = 2**32 - 1  # the seeds the pipeline takes (runtime.SEED_LIMIT); torch is not imported here
MAX_BODY = 16 * 1024  # bytes of a request body; a full request is well under 1 KB
MAX_WAITING = 64  # requests waiting for (or holding) the model; more are refused with 503
MAX_CURVE_POINTS = 1000  # per series sent to the page; longer records are thinned evenly
SOCKET_TIMEOUT_S = 30  # a client that stalls a read or a write this long is dropped

FILE_TYPES = {
    ".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
    ".json": "application/json", ".jsonl": "text/plain; charset=utf-8", ".md": "text/markdown; charset=utf-8",
    ".txt": "text/plain; charset=utf-8", ".csv": "text/csv; charset=utf-8", ".html": "text/html; charset=utf-8",
}  # fmt: skip
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
PAGE_CSP = "default-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
GENERATE_FIELDS = ("classes", "per_class", "sampler", "steps", "guidance", "seed")


class HTTPError(Exception):
    """A request the server refuses: sent as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_field(obj: dict, key: str, default, lo: int, hi: int):
    v = obj.get(key)
    if v is None:  # absent or null: the default, as for sampler and guidance
        return default
    if not _is_int(v):
        raise HTTPError(400, f"{key} must be an integer, got {json.dumps(v)[:40]}")
    if not lo <= v <= hi:
        raise HTTPError(400, f"{key} must be between {lo} and {hi}, got {str(v)[:40]}")
    return v


@dataclass(frozen=True)
class GenerateRequest:
    labels: tuple[int, ...]
    per_class: int
    sampler: str
    steps: int
    guidance: float
    seed: int

    def to_dict(self) -> dict:
        return {"labels": list(self.labels), "per_class": self.per_class, "sampler": self.sampler, "steps": self.steps,
                "guidance": self.guidance, "seed": self.seed}  # fmt: skip


def parse_generate(body: bytes, model: "ServedModel") -> GenerateRequest:
    """Check a /api/generate body against the limits and the model; HTTPError(400) says what is wrong."""

    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        obj = json.loads(body.decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise HTTPError(400, f"the request body is not valid JSON ({str(e).splitlines()[0][:80]})") from None
    if not isinstance(obj, dict):
        raise HTTPError(400, "the request body must be a JSON object")
    unknown = sorted(set(obj) - set(GENERATE_FIELDS))
    if unknown:
        raise HTTPError(400, f"unknown field {unknown[0][:40]!r}; fields are {', '.join(GENERATE_FIELDS)}")
    classes = obj.get("classes")
    if not isinstance(classes, list) or not classes:
        raise HTTPError(400, "classes must be a non-empty list of class numbers, e.g. [3, 7]")
    k = model.num_classes
    for c in classes:
        if not _is_int(c):
            raise HTTPError(400, f"classes must be integers, got {json.dumps(c)[:40]}")
        if not 0 <= c < k:
            raise HTTPError(400, f"class {str(c)[:40]} is out of range: classes are 0..{k - 1}")
    per_class = _int_field(obj, "per_class", 1, 1, MAX_IMAGES)
    if len(classes) * per_class > MAX_IMAGES:
        raise HTTPError(400, f"{len(classes)} classes x {per_class} per class is {len(classes) * per_class} images; at most {MAX_IMAGES} a request")
    sampler = obj.get("sampler")
    if sampler is None:
        sampler = model.samplers[0]
    elif sampler not in model.samplers:
        raise HTTPError(400, f"sampler must be one of {', '.join(model.samplers)} for this model, got {json.dumps(sampler)[:40]}")
    steps = _int_field(obj, "steps", None, 1, MAX_STEPS)
    steps = model.default_steps[sampler] if steps is None else steps
    guidance = obj.get("guidance")
    if guidance is None:
        guidance = model.guidance
    elif isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance <= MAX_GUIDANCE:
        raise HTTPError(400, f"guidance must be a number between 0 and {MAX_GUIDANCE:g}, got {json.dumps(guidance)[:40]}")
    seed = _int_field(obj, "seed", 0, 0, MAX_SEED)
    labels = tuple(c for c in classes for _ in range(per_class))
    return GenerateRequest(labels, per_class, sampler, steps, float(guidance), seed)


def _png_data_uri(array) -> str:
    """A uint8 (H, W) or (H, W, 3) array as a PNG data URI."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _hwc(image):
    """(C, H, W) uint8 tensor -> (H, W) or (H, W, 3) numpy array."""
    arr = image.permute(1, 2, 0).numpy()
    return arr[..., 0] if arr.shape[2] == 1 else arr


def _tile(images, cols: int, gap: int = 2):
    """uint8 (N, C, H, W) -> one (rows*(H+gap)-gap, cols*(W+gap)-gap[, 3]) array, row-major."""
    import numpy as np

    n, c, h, w = images.shape
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    out = np.zeros((rows * (h + gap) - gap, cols * (w + gap) - gap, c), dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, q = divmod(i, cols)
        out[r * (h + gap) : r * (h + gap) + h, q * (w + gap) : q * (w + gap) + w] = arr[i]
    return out[..., 0] if c == 1 else out


def expected_frames(steps: int) -> int:
    """How many frames Pipeline's ``trajectory`` receives for ``steps`` (its GIF_FRAMES rule)."""
    from .sample import GIF_FRAMES

    every = max(1, steps // GIF_FRAMES)
    return steps // every + (1 if steps % every else 0)


class ServerStopping(Exception):
    """Raised in a request's sampling when the server stops."""


class ServedModel:
    """One Pipeline shared by every request; sampling holds a lock, so requests take turns and
    each gets exactly the images it would get alone."""

    def __init__(self, pipe, run_dir: Path | None):
        from .models import count_parameters

        self.pipe = pipe
        self.lock = threading.Lock()
        self.stopping = threading.Event()  # set by SimpleDiTServer.stop: sampling ends at its next frame
        self._in_flight = 0
        self._idle = threading.Condition()
        self.num_classes = pipe.num_classes
        self.samplers = tuple(pipe.diffusion.samplers)
        self.default_steps = {s: min(pipe.diffusion.default_steps(s), MAX_STEPS) for s in self.samplers}
        self.guidance = float(pipe.guidance)
        if self.guidance > MAX_GUIDANCE:  # every request without a guidance of its own would be refused
            raise UserError(f"the model's default guidance, {self.guidance:g} (its guidance.json), is past the {MAX_GUIDANCE:g} that serve takes; "
                            "pick again with simple-dit eval RUN --guidance LIST, or delete guidance.json")  # fmt: skip
        cfg = pipe.config
        self.info = {
            "mode": "run", "name": run_dir.name if run_dir else "default model", "preset": cfg.preset,
            "description": cfg.description, "arch": cfg.model.arch, "objective": cfg.diffusion.objective,
            "parameters": count_parameters(pipe.model), "dataset": cfg.train.dataset,
            "num_classes": self.num_classes, "class_names": list(pipe.class_names),
            "image_size": cfg.model.input_size, "channels": cfg.model.in_channels, "device": str(pipe.device),
            "samplers": list(self.samplers), "default_steps": self.default_steps, "guidance": self.guidance,
            "limits": {"images": MAX_IMAGES, "steps": MAX_STEPS, "guidance": [0.0, MAX_GUIDANCE], "seed": [0, MAX_SEED]},
        }  # fmt: skip

    @contextlib.contextmanager
    def serving(self):
        """Around all a request does with tensors, down to freeing them: ``wait_idle`` waits for
        it. A thread still freeing a tensor when the interpreter exits aborts the process, and a
        request freed its tensors after giving the model's lock back (its traceback held them)."""
        with self._idle:
            self._in_flight += 1
        try:
            yield
        except BaseException as e:
            traceback.clear_frames(e.__traceback__)  # the frames' tensors are freed here, not while the process exits
            raise
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def sample(self, req: GenerateRequest, on_frame):
        """uint8 images (N, C, H, W) for ``req``; ``on_frame(frame)`` sees each trajectory frame
        as it is made. The one place that watches the Pipeline's progress: its ``trajectory``
        argument is a list it appends frames of the first batch to while it denoises, so a list
        whose ``append`` also forwards the frame streams them."""

        stopping = self.stopping

        class LiveFrames(list):
            def append(self, frame) -> None:
                if stopping.is_set():
                    raise ServerStopping("the server is stopping")
                super().append(frame)
                on_frame(frame)

        with self.lock:
            return self.pipe(list(req.labels), sampler=req.sampler, steps=req.steps, guidance=req.guidance, seed=req.seed,
                             batch_size=MAX_IMAGES, trajectory=LiveFrames())  # fmt: skip


def _thin(records: list[dict], limit: int = MAX_CURVE_POINTS) -> list[dict]:
    if len(records) <= limit:
        return records
    idx = sorted({round(i * (len(records) - 1) / (limit - 1)) for i in range(limit)})
    return [records[i] for i in idx]


def run_record(run_dir: Path | None) -> dict:
    """What /api/run returns: the training and evaluation records of metrics.jsonl (thinned to
    MAX_CURVE_POINTS each), guidance.json and the final sample grid, as far as they exist."""
    from .checkpoint import FINAL_GRID_NAME
    from .evaluate import GUIDANCE_NAME
    from .io import read_jsonl
    from .logger import METRICS_NAME, is_eval_record

    out = {"train": [], "eval": [], "guidance": None, "samples": None}
    if run_dir is None:
        return out
    records = read_jsonl(run_dir / METRICS_NAME)
    out["train"] = _thin([r for r in records if "loss" in r])
    out["eval"] = _thin([r for r in records if is_eval_record(r)])
    path = run_dir / GUIDANCE_NAME
    if path.is_file():
        try:
            out["guidance"] = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            out["guidance"] = {"error": f"{GUIDANCE_NAME} is damaged ({e})"}
    if (run_dir / FINAL_GRID_NAME).is_file():
        out["samples"] = f"/files/{FINAL_GRID_NAME}"
    return out


def _static_files() -> dict[str, tuple[bytes, str]]:
    files = {}
    for entry in resources.files("simple_dit").joinpath("static").iterdir():
        suffix = Path(entry.name).suffix
        if entry.is_file() and suffix in STATIC_TYPES:
            files[entry.name] = (entry.read_bytes(), STATIC_TYPES[suffix])
    return files


def is_compare_dir(directory: Path) -> bool:
    return (directory / "report.html").is_file() and (directory / "results.json").is_file()


class Handler(BaseHTTPRequestHandler):
    server_version = "simple-dit"
    timeout = SOCKET_TIMEOUT_S
    server: "SimpleDiTServer"

    # ---- responses ----------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        from .io import dumps_strict

        self._send(status, dumps_strict(obj).encode(), "application/json")

    def send_error(self, code, message=None, explain=None) -> None:
        """Every refusal, the http.server's own ones (a malformed request line, an unknown method)
        included, as a JSON body."""
        self.close_connection = True
        try:
            self._json(code, {"error": message or HTTPStatus(code).phrase})
        except OSError:
            pass

    def log_message(self, format, *args) -> None:
        if self.server.log_requests:
            super().log_message(format, *args)

    # ---- routing ------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._handle(self._get)

    def do_HEAD(self) -> None:
        self._handle(self._get)

    def do_POST(self) -> None:
        self._handle(self._post)

    def _handle(self, route) -> None:
        try:
            route(urlsplit(self.path).path)
        except HTTPError as e:
            self.send_error(e.status, str(e))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client went away
        except Exception:
            traceback.print_exc(file=sys.stderr)
            self.send_error(500, "internal error (see the server's log)")

    def _get(self, path: str) -> None:
        srv = self.server
        if path in ("/", "/index.html"):
            if srv.model is None:  # a compare directory
                return self._file("report.html")
            body, ctype = srv.static["index.html"]
            return self._send(200, body, ctype, {"Content-Security-Policy": PAGE_CSP})
        if path.startswith("/static/"):
            name = unquote(path[len("/static/") :])
            if name not in srv.static or name == "index.html":
                raise HTTPError(404, "not found")
            body, ctype = srv.static[name]
            return self._send(200, body, ctype)
        if path.startswith("/files/"):
            return self._file(unquote(path[len("/files/") :]))
        if path == "/api/info":
            return self._json(200, srv.model.info if srv.model else {"mode": "compare", "name": srv.root.name, "report": "/files/report.html"})
        if path == "/api/run":
            return self._json(200, run_record(srv.root))
        if path == "/api/generate":
            raise HTTPError(405, "use POST with a JSON body")
        raise HTTPError(404, "not found")

    def _post(self, path: str) -> None:
        if path != "/api/generate":
            raise HTTPError(404 if not path.startswith("/api/") else 405, "not found" if not path.startswith("/api/") else "use GET")
        if self.server.model is None:
            raise HTTPError(404, "this server shows a comparison report; it has no model to sample")
        body = self._read_body()
        req = parse_generate(body, self.server.model)
        if not self.server.waiting.acquire(blocking=False):
            raise HTTPError(503, f"busy: {MAX_WAITING} requests are already waiting for the model; try again shortly")
        try:
            with self.server.model.serving():
                self._stream(req)
        finally:
            self.server.waiting.release()

    def _read_body(self) -> bytes:
        # Only JSON: a cross-site page can then reach this endpoint only through a CORS preflight,
        # which this server never grants.
        if self.headers.get_content_type() != "application/json":
            raise HTTPError(415, "send the request body as Content-Type: application/json")
        lengths = self.headers.get_all("Content-Length") or []
        if self.headers.get("Transfer-Encoding"):
            raise HTTPError(411, "send the body with a Content-Length, not chunked")
        if not lengths:
            raise HTTPError(411, "a Content-Length header is required")
        if len(set(lengths)) > 1:  # which one frames the body is ambiguous (RFC 9112, 6.3)
            raise HTTPError(400, "the request has more than one Content-Length")
        length = lengths[0].strip()
        if not (length.isascii() and length.isdigit()):  # headers arrive as latin-1: "\xb2".isdigit(), yet int() refuses it
            raise HTTPError(400, "Content-Length must be a non-negative integer")
        n = int(length)
        if n > MAX_BODY:
            raise HTTPError(413, f"the request body is {n} bytes; at most {MAX_BODY}")
        body = self.rfile.read(n)
        if len(body) < n:
            raise HTTPError(400, "the request body is shorter than its Content-Length")
        return body

    # ---- files --------------------------------------------------------------------------------

    def _file(self, rel: str) -> None:
        """A file inside the served directory: no '..', no hidden files, no way out through a
        symbolic link, and only the FILE_TYPES suffixes (so never a checkpoint or a lock)."""
        root = self.server.root
        if root is None:
            raise HTTPError(404, "not found")
        parts = rel.split("/")
        if "\x00" in rel or "\\" in rel or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            raise HTTPError(403, "that path is outside the served directory")
        try:
            path = root.joinpath(*parts).resolve(strict=True)
        except (OSError, RuntimeError):
            raise HTTPError(404, "not found") from None
        if not path.is_relative_to(self.server.root_resolved):
            raise HTTPError(403, "that path is outside the served directory")
        ctype = FILE_TYPES.get(path.suffix.lower())
        if ctype is None or not path.is_file():
            raise HTTPError(404, "not found")
        try:
            body = path.read_bytes()
        except OSError:
            raise HTTPError(404, "not found") from None
        self._send(200, body, ctype)

    # ---- sampling -----------------------------------------------------------------------------

    def _event(self, name: str, obj) -> None:
        from .io import dumps_strict

        self.wfile.write(f"event: {name}\ndata: {dumps_strict(obj)}\n\n".encode())
        self.wfile.flush()

    def _stream(self, req: GenerateRequest) -> None:
        model = self.server.model
        n = len(req.labels)
        cols = req.per_class if req.per_class <= 12 else min(n, 10)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.close_connection = True  # the end of the stream is the end of the connection
        total = expected_frames(req.steps)
        self._event("start", req.to_dict() | {"frames": total, "columns": cols})
        count = 0

        def on_frame(frame) -> None:
            nonlocal count
            count += 1
            self._event("frame", {"index": count, "frames": total, "image": _png_data_uri(_tile(frame, cols))})

        start = time.perf_counter()
        try:
            images = model.sample(req, on_frame)
        except (UserError, ServerStopping) as e:
            return self._event("error", {"error": str(e)})
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            raise
        except Exception:
            traceback.print_exc(file=sys.stderr)
            return self._event("error", {"error": "internal error while sampling (see the server's log)"})
        names = model.pipe.class_names
        self._event("done", {
            "seconds": time.perf_counter() - start, "width": images.shape[3], "height": images.shape[2], "columns": cols,
            "grid": _png_data_uri(_tile(images, cols)),
            "images": [{"label": y, "class_name": names[y], "image": _png_data_uri(_hwc(img))} for y, img in zip(req.labels, images)],
        })  # fmt: skip


class SimpleDiTServer(ThreadingHTTPServer):
    daemon_threads = True  # a stalled client never keeps the process alive on exit
    allow_reuse_address = True

    def __init__(self, address, root: Path | None, model: ServedModel | None, *, log_requests: bool = False):
        self.root = root
        self.root_resolved = root.resolve() if root is not None else None
        self.model = model
        self.log_requests = log_requests
        self.static = _static_files()
        self.waiting = threading.BoundedSemaphore(MAX_WAITING)
        # IPv4 or IPv6, as the host asks (--host ::1): the class's default is IPv4 alone.
        self.address_family = socket.getaddrinfo(*address, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        super().__init__(address, Handler)

    def stop(self, wait_s: float = 60.0) -> None:
        """Stop the requests' sampling at its next frame and wait (up to ``wait_s``) for them to
        end: PyTorch still at work in a thread when the interpreter exits aborts the process."""
        if self.model is not None:
            self.model.stopping.set()
            self.model.wait_idle(wait_s)
        self.server_close()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def load_served(directory: Path | None, device=None) -> tuple[Path | None, ServedModel | None]:
    """(root, model) for a run directory, a compare directory (no model) or None (the packaged
    default model, where the package has one); a one-line UserError for anything else."""
    from .sample import Pipeline

    if directory is None:
        return None, ServedModel(Pipeline.from_pretrained(device=device), None)
    directory = Path(directory)
    if not directory.exists():
        raise UserError(f"{directory} does not exist")
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory: give a run directory or a `simple-dit compare` directory")
    if is_compare_dir(directory):
        return directory, None
    try:
        pipe = Pipeline.from_pretrained(directory, device=device)
    except UserError as e:
        if str(e).startswith("no checkpoint at"):
            raise UserError(f"{directory} is not a run directory (no checkpoint) nor a `simple-dit compare` directory (no report.html and results.json)") from None
        raise
    return directory, ServedModel(pipe, directory)


def make_server(directory: Path | None, host: str = "127.0.0.1", port: int = 8000, *, device=None,
                log_requests: bool = False) -> SimpleDiTServer:  # fmt: skip
    """A server bound to ``host:port`` (0: any free port; see ``.url``), not yet serving."""
    if not _is_int(port) or not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {port}")
    root, model = load_served(directory, device=device)
    try:
        return SimpleDiTServer((host, port), root, model, log_requests=log_requests)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use; stop what holds it or choose another --port (0 picks a free one)") from None
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(directory: Path | None, host: str = "127.0.0.1", port: int = 8000, *, device=None) -> None:
    """Serve until Ctrl-C."""
    server = make_server(directory, host, port, device=device, log_requests=True)
    what = "the comparison report" if server.model is None else f"{server.model.info['name']} ({server.model.info['preset']})"
    print(f"simple-dit: serving {what} at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("simple-dit: server stopped", file=sys.stderr)
    finally:
        server.stop()
