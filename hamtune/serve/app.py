"""`hamtune serve`: a local web page and JSON API that show one model's answer for one dermatoscopic image.

A research tool, not a diagnostic device: the page says so at the top. It binds to 127.0.0.1 unless --host says
otherwise. FastAPI parses the requests and uvicorn serves them; images are decoded exactly as training decodes them
(hamtune.serve.predictor.Predictor), so the page and `hamtune predict` give the same probabilities for the same file.

API (every error is a 4xx with a one-line JSON body {"detail": "..."}; the server keeps serving):

    GET  /          the page (drop or choose an image; bar chart of the seven diagnoses; Grad-CAM overlay)
    GET  /health    {"status": "ok"}
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
        or image over 40 megapixels; 415 not a JPEG/PNG; 422 truncated or corrupt image; 400 no `file` field or a
        malformed multipart body.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import logging
import socket
from pathlib import Path
from typing import Callable

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from hamtune.errors import HamtuneError
from hamtune.serve.predictor import ImageRejected, Predictor
from hamtune.vocab import DIAGNOSES

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # a 600x450 dermatoscopic JPEG is ~50 kB; phone photos stay well below this
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


def create_app(predictor: Predictor, *, max_upload_bytes: int = MAX_UPLOAD_BYTES):
    """The FastAPI app around one Predictor (see the module docstring for the routes)."""
    app = FastAPI(title="hamtune", description="Research tool, not a diagnostic device.", docs_url=None,
                  redoc_url=None)
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
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/info")
    def model_info() -> dict:
        return info

    @app.post("/predict")
    async def predict(request: Request, heatmap: bool = True) -> dict:
        try:
            async with request.form(max_files=1, max_fields=10) as form:
                upload = form.get("file")
                data = await upload.read() if isinstance(upload, UploadFile) else None
        except StarletteHTTPException as exc:  # starlette's 400 for a broken multipart body; 413 from BodySizeLimit
            if exc.status_code != 400:
                raise
            raise HTTPException(400, f"malformed multipart body ({exc.detail})") from None
        if data is None:
            raise HTTPException(400, "no file in the multipart field 'file'; expected a JPEG or PNG image there")
        try:
            return await run_in_threadpool(answer, predictor, data, heatmap)
        except ImageRejected as exc:
            raise HTTPException(exc.status, str(exc)) from None

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


def serve(model_path: Path, *, host: str = "127.0.0.1", port: int = 8000, echo: Echo = print) -> None:
    """Load the model, bind, and serve until Ctrl+C (or SIGTERM)."""
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
    config = uvicorn.Config(create_app(predictor), log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
