"""``blip serve``: an HTTP server for one model, with the hosted BLIP-2 predict schema and request batching.

Endpoints (OpenAPI docs at ``/docs``):
- ``POST /predictions``: the hosted schema. Multipart form data (file field ``image``; fields ``caption``,
  ``question`` (default "What is this a picture of?"), ``context``, ``use_nucleus_sampling``, ``temperature``
  (default 1), ``seed``) or a JSON object with ``image`` as base64 or a data URI -> ``{"output": "..."}``.
- ``POST /caption`` -> ``{"caption"}``, ``POST /answer`` -> ``{"answer"}``, ``POST /match`` (``texts``) ->
  ``{"scores": [{"text", "itm", "itc"}]}``, with the same two encodings and the decoding fields of
  :class:`blip.predictor.Decoding`.
- ``GET /health``: model, device, dtype, queue length, whether a batch is running.

Images come only as request bytes: the server never opens a path or fetches a URL a client names. Requests wait in a
bounded queue; one worker gathers them for up to ``max_wait_ms`` (or until ``max_batch_size``), groups those with
equal settings into one forward pass each, and hands every request its own result. Sampling is seeded per request
(one generator per row), so a seeded request gives the same output whatever it is batched with.
Errors: 413 for oversized bodies or images (bytes, or pixels read from the header before decoding), 400 (with the
reason) for malformed bodies and undecodable images, 422 for invalid fields or a task the model cannot do, 503 when
the queue is full, 504 after ``timeout_s``.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from .predictor import DEFAULT_QUESTION, Decoding, Predictor, UsageError

log = logging.getLogger("blip.serve")


@dataclass
class ServeConfig:
    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 256
    timeout_s: float = 60.0
    max_image_bytes: int = 20 * 2**20
    max_pixels: int = 50_000_000   # width x height, read from the header before decoding (a small file can be huge)
    decoding: Decoding = field(default_factory=Decoding)   # defaults for fields a request leaves out

    @property
    def max_body_bytes(self) -> int:  # a base64 image is 4/3 of its bytes; room for the other fields
        return math.ceil(self.max_image_bytes * 4 / 3) + 2**20


# ---- request schemas ------------------------------------------------------------------------------------------------
class DecodingFields(BaseModel):
    num_beams: int | None = Field(None, ge=1, le=32)
    max_new_tokens: int | None = Field(None, ge=1, le=512)
    min_new_tokens: int | None = Field(None, ge=0, le=512)
    do_sample: bool = False
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    temperature: float = Field(1.0, gt=0.0, le=10.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    seed: int | None = Field(None, ge=0, lt=2**63)

    def decoding(self, defaults: Decoding) -> Decoding:
        """The server's defaults with the fields this request set."""
        own = self.model_dump(include=self.model_fields_set & (set(Decoding.__dataclass_fields__)))
        return replace(defaults, **own)


class PredictionFields(BaseModel):
    """The hosted BLIP-2 inputs (besides ``image``)."""
    caption: bool = False
    question: str = DEFAULT_QUESTION
    context: str | None = None
    use_nucleus_sampling: bool = False
    temperature: float = Field(1.0, gt=0.0, le=10.0)
    seed: int | None = Field(None, ge=0, lt=2**63)


class CaptionFields(DecodingFields):
    prompt: str | None = None


class AnswerFields(DecodingFields):
    question: str = Field(..., min_length=1)
    context: str | None = None


class MatchFields(BaseModel):
    texts: list[str] = Field(..., min_length=1, max_length=256)


# ---- reading a request ----------------------------------------------------------------------------------------------
def _image_from_text(text: str) -> bytes:
    """base64 or a data URI -> bytes; paths and URLs are refused."""
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise HTTPException(400, "image data URI must be base64-encoded (data:image/...;base64,...)")
    elif "://" in text:
        raise HTTPException(400, "image must be uploaded bytes, base64 or a data URI; the server does not open paths "
                                 "or fetch URLs")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, "image is not valid base64") from None


async def read_request(request: Request, schema: type[BaseModel], limit: int) -> tuple[bytes, BaseModel]:
    """Multipart form data or JSON -> (image bytes, validated fields)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        try:
            form = await request.form()
        except HTTPException:
            raise
        except Exception as e:  # noqa: BLE001 - the multipart parser's own error types
            raise HTTPException(400, f"malformed multipart body ({e})") from None
        image = form.get("image")
        fields = {k: (form.getlist(k) if k == "texts" else v) for k, v in form.items() if k != "image"}
        raw = await image.read() if hasattr(image, "read") else _image_from_text(image) if image else None
    elif kind == "application/json":
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise HTTPException(400, f"malformed JSON body ({e})") from None
        if not isinstance(body, dict):
            raise HTTPException(400, "the JSON body must be an object with an image field")
        image = body.pop("image", None)
        if image is not None and not isinstance(image, str):
            raise HTTPException(400, "image must be a base64 string or a data URI")
        raw, fields = (_image_from_text(image) if image else None), body
    else:
        raise HTTPException(415, "send multipart/form-data (file field image) or application/json (image as base64)")
    if not raw:
        raise HTTPException(422, "image is required (a file field named image, or base64 in JSON)")
    if len(raw) > limit:
        raise HTTPException(413, f"image is {len(raw)} bytes; the limit is {limit}")
    try:
        return raw, schema.model_validate(fields)
    except ValidationError as e:
        raise HTTPException(422, json.loads(e.json(include_url=False))) from None


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``limit`` bytes, by Content-Length or while streaming."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            response = JSONResponse({"detail": f"request body of {int(length)} bytes is over the limit of "
                                               f"{self.limit}"}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"request body is over the limit of {self.limit} bytes")
            return message

        return await self.app(scope, limited, send)


# ---- batching -------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    kind: str                    # "caption" | "answer" | "match"
    pixels: torch.Tensor         # [3, S, S]
    decoding: Decoding | None = None
    question: str | None = None
    context: str | None = None
    texts: list[str] | None = None
    seed: int | None = None
    future: asyncio.Future = field(default=None)

    def group_key(self) -> tuple:
        if self.kind == "match":
            return ("match", id(self))   # one image against its own texts: never merged
        return (self.kind, tuple(sorted(self.decoding.as_dict().items())))


class Batcher:
    """A bounded queue and one worker that runs grouped batches on a thread (the event loop stays free)."""

    def __init__(self, predictor: Predictor, cfg: ServeConfig):
        self.predictor, self.cfg = predictor, cfg
        self.queue: asyncio.Queue[Job] = asyncio.Queue(cfg.max_queue)
        self.running = 0            # requests in the batch on the device now
        self.batches = 0
        self.task: asyncio.Task | None = None
        # one thread owns the device: batches never wait behind image decoding in the shared pool
        self.device_thread = ThreadPoolExecutor(1, thread_name_prefix="blip-device")

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, job: Job) -> Any:
        job.future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise HTTPException(503, f"busy: {self.cfg.max_queue} requests are waiting; retry later") from None
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.cfg.timeout_s)
        except asyncio.TimeoutError:
            job.future.cancel()
            raise HTTPException(504, f"no result within {self.cfg.timeout_s} s") from None

    async def _gather(self) -> list[Job]:
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.cfg.max_wait_ms / 1000
        while len(batch) < self.cfg.max_batch_size:
            try:
                batch.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return [job for job in batch if not job.future.done()]   # timed-out requests are dropped

    async def _loop(self) -> None:
        while True:
            groups: dict[tuple, list[Job]] = {}
            for job in await self._gather():
                groups.setdefault(job.group_key(), []).append(job)
            for jobs in groups.values():
                self.running = len(jobs)
                try:
                    results = await asyncio.get_running_loop().run_in_executor(self.device_thread, self._run, jobs)
                except Exception as e:  # noqa: BLE001 - one failed batch must not stop the server
                    log.exception("batch of %d %s requests failed", len(jobs), jobs[0].kind)
                    results = [e] * len(jobs)
                finally:
                    self.running = 0
                    self.batches += 1
                for job, result in zip(jobs, results):
                    if not job.future.done():
                        (job.future.set_exception if isinstance(result, Exception) else job.future.set_result)(result)

    def _run(self, jobs: list[Job]) -> list:
        p, first = self.predictor, jobs[0]
        if first.kind == "match":
            return [p.match(first.pixels[None], first.texts)]
        pixels = torch.stack([j.pixels for j in jobs])
        seeds = [j.seed for j in jobs]
        if first.kind == "caption":
            return p.caption(pixels, first.decoding, seeds)
        return p.answer(pixels, [j.question for j in jobs], first.decoding, [j.context for j in jobs], seeds)


# ---- the app --------------------------------------------------------------------------------------------------------
def _openapi_body(schema: type[BaseModel]) -> dict:
    """Request body documentation for the two accepted encodings."""
    fields = schema.model_json_schema()
    form = {**fields, "properties": {"image": {"type": "string", "format": "binary"}, **fields.get("properties", {})},
            "required": ["image", *fields.get("required", [])]}
    js = {**fields, "properties": {"image": {"type": "string", "description": "base64 or a data URI"},
                                   **fields.get("properties", {})}, "required": form["required"]}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form},
                                                          "application/json": {"schema": js}}}}


class Service:
    """What the routes share: the model, the limits, the batcher and the image transform."""

    def __init__(self, predictor: Predictor, cfg: ServeConfig):
        self.predictor, self.cfg = predictor, cfg
        self.batcher = Batcher(predictor, cfg)
        self.transform = predictor.transform()

    async def read(self, request: Request, schema: type[BaseModel]) -> tuple[bytes, BaseModel]:
        return await read_request(request, schema, self.cfg.max_image_bytes)

    def _decode(self, raw: bytes) -> torch.Tensor:
        import io

        from PIL import Image

        from .data.images import ImageDecodeError, load_image
        try:
            with Image.open(io.BytesIO(raw)) as header:   # the size only: nothing is decoded yet
                pixels = header.width * header.height
        except Exception:  # noqa: BLE001 - not an image: load_image below names the problem
            pixels = 0
        if pixels > self.cfg.max_pixels:
            raise HTTPException(413, f"image has {pixels} pixels; the limit is {self.cfg.max_pixels}")
        try:
            return self.transform(load_image(raw))
        except ImageDecodeError as e:
            raise HTTPException(400, f"image: {e.reason}") from None

    async def run(self, job: Job, raw: bytes) -> Any:
        """Decode off the event loop, then wait for the job's batch."""
        job.pixels = await asyncio.to_thread(self._decode, raw)
        return await self.batcher.submit(job)

    def health(self) -> dict:
        p, b = self.predictor, self.batcher
        return {"status": "ok", "model": p.name, "class": type(p.model).__name__, "tasks": list(p.tasks),
                "device": str(p.device), "dtype": str(p.dtype).removeprefix("torch."), "queued": b.queue.qsize(),
                "running": b.running, "batches": b.batches, "max_batch_size": self.cfg.max_batch_size}


def create_app(predictor: Predictor, cfg: ServeConfig | None = None) -> FastAPI:
    from contextlib import asynccontextmanager

    service = Service(predictor, cfg or ServeConfig())

    @asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        yield
        service.batcher.task.cancel()
        service.batcher.device_thread.shutdown(wait=False)

    app = FastAPI(title="blip", description=__doc__, lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=service.cfg.max_body_bytes)

    @app.exception_handler(UsageError)
    async def unusable(request: Request, e: UsageError) -> JSONResponse:  # a task or setting this model cannot do
        return JSONResponse({"detail": str(e)}, status_code=422)

    _add_routes(app, service)
    return app


def _add_routes(app: FastAPI, service: Service) -> None:
    check, defaults = service.predictor.check, service.cfg.decoding

    @app.get("/health")
    async def health() -> dict:
        return service.health()

    @app.post("/predictions", openapi_extra=_openapi_body(PredictionFields))
    async def predictions(request: Request) -> dict:
        raw, f = await service.read(request, PredictionFields)
        decoding = replace(defaults, do_sample=f.use_nucleus_sampling, temperature=f.temperature)
        if f.caption or not f.question.strip():
            check("caption", decoding)
            return {"output": await service.run(Job("caption", None, decoding, seed=f.seed), raw)}
        check("answer", decoding, f.context)
        return {"output": await service.run(Job("answer", None, decoding, f.question, f.context, seed=f.seed), raw)}

    @app.post("/caption", openapi_extra=_openapi_body(CaptionFields))
    async def caption(request: Request) -> dict:
        raw, f = await service.read(request, CaptionFields)
        decoding = f.decoding(defaults)
        check("caption", decoding)
        return {"caption": await service.run(Job("caption", None, decoding, seed=f.seed), raw)}

    @app.post("/answer", openapi_extra=_openapi_body(AnswerFields))
    async def answer(request: Request) -> dict:
        raw, f = await service.read(request, AnswerFields)
        decoding = f.decoding(defaults)
        check("answer", decoding, f.context)
        return {"answer": await service.run(Job("answer", None, decoding, f.question, f.context, seed=f.seed), raw)}

    @app.post("/match", openapi_extra=_openapi_body(MatchFields))
    async def match(request: Request) -> dict:
        raw, f = await service.read(request, MatchFields)
        check("match")
        return {"scores": await service.run(Job("match", None, texts=f.texts), raw)}


def serve(predictor: Predictor, host: str = "127.0.0.1", port: int = 8000, cfg: ServeConfig | None = None) -> None:
    import sys

    import uvicorn
    # The device thread holds the GIL between kernels; hand it over sooner so /health and request parsing stay
    # responsive while a batch runs (Python's default is 5 ms per hand-over).
    sys.setswitchinterval(0.0005)
    uvicorn.run(create_app(predictor, cfg), host=host, port=port, log_level="info")
