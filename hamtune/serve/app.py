"""`hamtune serve`: a local web page and JSON API that show one model's answer for one dermatoscopic image.

A research tool, not a diagnostic device: the page says so at the top. It binds to 127.0.0.1 unless --host says
otherwise. FastAPI parses the requests and uvicorn serves them; images are decoded exactly as training decodes them
(hamtune.serve.predictor.Predictor), so the page and `hamtune predict` give the same probabilities for the same file.

API (every error is a 4xx, or a 503 when busy, with a one-line JSON body {"detail": "..."}; the server keeps
serving):

    GET  /          the page (drop or choose an image; bar chart of the seven diagnoses; Grad-CAM overlay)
    GET  /health    {"status": "ok", "in_progress": images being answered now, "pending": requests in (being read,
                    waiting or answered), "slots": how many may be answered at once}
    GET  /info      the model: name, image_size, members, calibration, classes (code, name), Grad-CAM layer
    POST /predict   multipart/form-data with the image (JPEG or PNG) in the field `file`;
                    query ?heatmap=false skips the Grad-CAM (faster). Answer:
        {"probabilities": [{"code": "akiec", "name": "Actinic keratoses / ...", "probability": 0.01}, ...],  # 7, in
                                                                       # hamtune.vocab.CLASSES order, sum 1
         "top": {"code": "nv", "name": "Melanocytic nevus", "probability": 0.83},
         "heatmap": {"code": "nv", "name": "Melanocytic nevus", "layer": "backbone.layer3 (4x4)", "size": 256,
                     "png_base64": "..."}}   # null with ?heatmap=false
        Probabilities are the model file's members averaged and calibrated as the file says, and "top" is the
        diagnosis its decision rule picks (exactly what `hamtune predict` gives): for a calibrated file the
        networks' own choice (the argmax before calibration), not always the largest calibrated probability. The heatmap PNG is the centre square the model sees (at 256 px) with the top
        class's Grad-CAM blended over it (an ensemble: the mean of its members' maps). Errors: 413 body over 20 MB
        or image over 40 megapixels (hamtune.data.images.MAX_IMAGE_PIXELS, read from the header before decoding);
        415 not a JPEG/PNG; 422 truncated or corrupt image, or under 8 pixels on a side; 400 no `file` field or a
        malformed multipart body; 503 with Retry-After when the server is busy (below).

Under load the memory stays flat and bounded: at most `max_concurrent` images are decoded and run through the
network at once, on that many dedicated threads (so the decoded pixels and torch's buffers live in a fixed set of
threads' allocator arenas, not in one per thread of a growing pool); a request that finds every slot taken waits up
to `queue_wait_s` and is then answered 503 with Retry-After; at most `max_pending` requests are read at once (each
body is bounded by max_upload_bytes, refused before it is read when Content-Length announces more), further ones get
503 before their body is read. Nothing is kept per request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import ipaddress
import logging
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from hamtune.errors import HamtuneError
from hamtune.serve.predictor import ImageRejected, Predictor
from hamtune.vocab import DIAGNOSES

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # a 600x450 dermatoscopic JPEG is ~50 kB; phone photos stay well below this
MAX_CONCURRENT = 2  # images decoded and answered at once: one in the network while the next decodes
QUEUE_WAIT_S = 5.0  # how long a request waits for a slot before it is answered 503
MAX_PENDING = 16  # requests read or waiting at once (each body up to MAX_UPLOAD_BYTES in memory); more get 503
RETRY_AFTER_S = 1
DISPLAY_SIZE = 256  # side of the heatmap overlay the page shows
PAGE = Path(__file__).with_name("page.html")

Echo = Callable[[str], None]


class BodySizeLimit:
    """ASGI middleware: a request body over max_bytes gets 413, whether Content-Length announces it or chunks reveal
    it, before it is spooled anywhere."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"upload over {self.max_bytes // (1024 * 1024)} MB; send a smaller image"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await JSONResponse({"detail": too_large}, status_code=413)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, too_large)
            return message

        await self.app(scope, counted, send)


class Slots:
    """At most `size` answers computed at once, on `size` dedicated threads; a request that waits longer than
    `wait_s` for one, or arrives when `max_pending` requests are already in, is told to come back (503)."""

    def __init__(self, size: int, wait_s: float, max_pending: int):
        if size < 1 or max_pending < size or wait_s < 0:
            raise HamtuneError(f"serve limits: {size} slots, {max_pending} pending, {wait_s} s wait; expected "
                               "slots >= 1, pending >= slots and a wait >= 0")
        self.size, self.wait_s, self.max_pending = size, wait_s, max_pending
        self.pending = 0  # requests admitted (reading their body, waiting or being answered); event-loop only
        self.in_progress = 0
        self._free = asyncio.Semaphore(size)
        self._threads = ThreadPoolExecutor(max_workers=size, thread_name_prefix="hamtune-answer")

    def busy(self, why: str) -> HTTPException:
        return HTTPException(503, f"server busy: {why}; retry in {RETRY_AFTER_S} s",
                             headers={"Retry-After": str(RETRY_AFTER_S)})

    def admit(self) -> None:
        """Count a request in before its body is read, or refuse it (503) when max_pending are already in."""
        if self.pending >= self.max_pending:
            raise self.busy(f"{self.pending} requests already in progress")
        self.pending += 1

    def leave(self) -> None:
        self.pending -= 1

    async def run(self, fn: Callable, *args):
        """fn(*args) on a slot's thread once one is free (503 after wait_s). The slot is freed when fn returns, even
        if the client has gone: a disconnect never lets more than `size` answers run at once."""
        if self._free.locked():
            try:
                await asyncio.wait_for(self._free.acquire(), timeout=self.wait_s)
            except TimeoutError:
                raise self.busy(f"every answer slot ({self.size}) taken for {self.wait_s:g} s") from None
        else:
            await self._free.acquire()  # free: returns at once (wait_for with a timeout of 0 would refuse it)
        self.in_progress += 1
        try:
            future = asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)
        except BaseException:
            self.in_progress -= 1
            self._free.release()
            raise
        future.add_done_callback(self._release)
        return await asyncio.shield(future)

    def _release(self, future: asyncio.Future) -> None:
        self.in_progress -= 1
        self._free.release()
        if not future.cancelled():
            future.exception()  # seen: if the client has gone nobody reads it, and asyncio would log it

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)


def create_app(predictor: Predictor, *, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_concurrent: int = MAX_CONCURRENT,
               queue_wait_s: float = QUEUE_WAIT_S, max_pending: int = MAX_PENDING):
    """The FastAPI app around one Predictor (see the module docstring for the routes and the limits)."""
    slots = Slots(max_concurrent, queue_wait_s, max(max_pending, max_concurrent))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        slots.close()

    app = FastAPI(title="hamtune", description="Research tool, not a diagnostic device.", docs_url=None,
                  redoc_url=None, lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=max_upload_bytes)
    logging.getLogger("python_multipart").setLevel(logging.ERROR)  # a bad body is answered with 400, not logged

    @app.exception_handler(RequestValidationError)
    async def one_line_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = " ".join(str(part) for part in first.get("loc", ()))
        return JSONResponse({"detail": f"{where}: {first.get('msg')} (got {first.get('input')!r})"}, status_code=422)
    page = PAGE.read_text(encoding="utf-8")
    info = predictor.describe()

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "in_progress": slots.in_progress, "pending": slots.pending, "slots": slots.size}

    @app.get("/info")
    def model_info() -> dict:
        return info

    @app.post("/predict", response_model=None)
    async def predict(request: Request, heatmap: bool = True) -> dict | Response:
        slots.admit()
        try:
            try:
                async with request.form(max_files=1, max_fields=10) as form:
                    upload = form.get("file")
                    data = await upload.read() if isinstance(upload, UploadFile) else None
            except StarletteHTTPException as exc:  # starlette's 400 for a broken multipart body; 413 from BodySizeLimit
                if exc.status_code != 400:
                    raise
                raise HTTPException(400, f"malformed multipart body ({exc.detail})") from None
            except ClientDisconnect:  # the client left mid-upload: nobody to answer, nothing to log
                return Response(status_code=400)
            if data is None:
                raise HTTPException(400, "no file in the multipart field 'file'; expected a JPEG or PNG image there")
            try:
                return await slots.run(answer, predictor, data, heatmap)
            except ImageRejected as exc:
                raise HTTPException(exc.status, str(exc)) from None
        finally:
            slots.leave()

    return app


def answer(predictor: Predictor, data: bytes, heatmap: bool = True) -> dict:
    """The /predict JSON for one encoded image (raises ImageRejected for an unusable one)."""
    image = predictor.decode(data)
    probs = predictor.predict_proba(image[None])[0]
    rows = [{"code": c, "name": DIAGNOSES[c], "probability": float(p)} for c, p in zip(predictor.classes, probs)]
    top = int(predictor.decide(probs[None])[0])
    out = {"probabilities": rows, "top": rows[top], "heatmap": None}
    if heatmap:
        cam = predictor.gradcam(image, top)
        overlay = overlay_png(predictor.decode(data, DISPLAY_SIZE), cam)
        out["heatmap"] = {"code": rows[top]["code"], "name": rows[top]["name"], "layer": predictor.cam_layers,
                          "size": DISPLAY_SIZE,
                          "png_base64": base64.b64encode(overlay).decode("ascii")}
    return out


def overlay_png(image_u8: np.ndarray, heat: np.ndarray, *, strength: float = 0.6) -> bytes:
    """PNG of the image with the heatmap (in [0, 1], any size) coloured and blended where it is hot."""
    from matplotlib import colormaps
    from PIL import Image

    side = image_u8.shape[0]
    heat = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((side, side), Image.BILINEAR))
    heat = np.clip(heat, 0.0, 1.0)[..., None]
    colour = colormaps["jet"](heat[..., 0])[..., :3] * 255.0
    alpha = strength * heat
    blended = (image_u8.astype(np.float32) * (1.0 - alpha) + colour * alpha).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(blended).save(buf, format="PNG")
    return buf.getvalue()


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening (port 0: a free one), or a one-line HamtuneError."""
    if not 0 <= port <= 65535:
        raise HamtuneError(f"--port {port}: expected 0..65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise HamtuneError(f"--host {host}: cannot be resolved ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)  # queue clients that connect while uvicorn starts
    except OSError as exc:
        sock.close()
        raise HamtuneError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(model_path: Path, *, host: str = "127.0.0.1", port: int = 8000, echo: Echo = print,
          max_concurrent: int | None = None, queue_wait_s: float | None = None,
          max_pending: int | None = None) -> None:
    """Load the model, bind, and serve until Ctrl+C (or SIGTERM), with the limits of create_app (None: defaults)."""
    max_concurrent = MAX_CONCURRENT if max_concurrent is None else max_concurrent
    queue_wait_s = QUEUE_WAIT_S if queue_wait_s is None else queue_wait_s
    max_pending = MAX_PENDING if max_pending is None else max_pending
    import uvicorn

    predictor = Predictor.from_file(model_path)
    sock = listening_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    info = predictor.describe()
    scaling = (f", calibrated (temperature {info['temperature']:.3f}, class biases)" if info["calibrated"] else "")

    echo(f"model {model_path}: {info['model']}, {info['image_size']}px{scaling}, Grad-CAM on {info['gradcam_layer']}")
    if not is_loopback(bound_host):
        echo(f"listening on {bound_host}: anyone who can reach this machine on port {bound_port} can use the page")
    echo(f"serving on http://{shown}:{bound_port}/ (a research tool, not a diagnostic device; Ctrl+C stops)")
    app = create_app(predictor, max_concurrent=max_concurrent, queue_wait_s=queue_wait_s, max_pending=max_pending)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
