"""``blip serve``: an HTTP server for one model, with the hosted BLIP-2 predict schema and request batching.

Endpoints (OpenAPI docs at ``/docs``):
- ``POST /predictions``: the hosted schema. Multipart form data (file field ``image``; fields ``caption``,
  ``question`` (default "What is this a picture of?"), ``context``, ``use_nucleus_sampling``, ``temperature``
  (default 1), ``seed``) or a JSON object with ``image`` as base64 or a data URI -> ``{"output": "..."}``.
  Cog's form, ``{"input": {...}}`` (the hosted model's inputs: salesforce/blip-2's above, or for BLIP
  salesforce/blip's ``task``, ``question``, ``caption``), answers Cog's ``{"status": "succeeded", "output", ...}``.
- ``POST /caption`` -> ``{"caption"}``, ``POST /answer`` -> ``{"answer"}``, ``POST /match`` (``texts``) ->
  ``{"scores": [{"text", "itm", "itc"}]}``, with the same two encodings and the decoding fields of
  :class:`blip.predictor.Decoding`.
- ``GET /health``: model, device, dtype, queue length, whether a batch is running. ``GET /health-check``: Cog's.
- ``/openapi.json`` carries Cog's ``Input`` (the hosted model's fields) and ``Output`` schemas.
- :mod:`blip.serve_replicate` adds the Replicate HTTP API (``/v1``) that ``blip serve`` also answers.

With ``ServeConfig.api_token`` every request but ``GET /health-check`` needs ``Authorization: Bearer <token>``
(401 otherwise, before anything is read). Images come only as request bytes: the server never opens a path or
fetches a URL a client names. Requests wait in a bounded queue; one worker gathers them for up to ``max_wait_ms``
(or until ``max_batch_size``), groups those with equal settings into one forward pass each, and hands every request
its own result. Sampling is seeded per request (one generator per row), so a seeded request gives the same output
whatever it is batched with.
Every request is checked before it is queued: unknown fields, settings, and the prompt's length with the new tokens
against the model's positions (:meth:`blip.predictor.Predictor.check`). A batch that fails anyway is run again
request by request, so only the request that fails alone gets an error. At most ``max_decodes`` images are decoded at
once, and memory is handed back after large ones (:func:`release_memory`).
Errors: 413 for oversized bodies or images (bytes, or pixels read from the header before decoding), 400 (with the
reason) for malformed bodies and undecodable images, 422 for invalid or unknown fields, prompts too long for the
model or a task the model cannot do, 503 (with ``Retry-After``) when the queue is full, 504 after ``timeout_s``.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import gc
import hmac
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Literal

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .predictor import DEFAULT_QUESTION, Decoding, Predictor, UsageError

log = logging.getLogger("blip.serve")
RETRY_AFTER_S = 1                 # the Retry-After of a 503 (queue full)
LARGE_IMAGE_PIXELS = 2**22        # decoding more than this many pixels hands the freed memory back afterwards


def release_memory() -> None:
    """Hand freed memory back to the operating system: collect cycles, then glibc's ``malloc_trim`` (without it,
    freed image buffers stay in the allocator's arenas and the process keeps its peak size); where the C library has
    no ``malloc_trim`` only the collection runs."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _malloc_trim():
    import ctypes
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None


_MALLOC_TRIM = _malloc_trim()


@dataclass
class ServeConfig:
    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 256           # requests waiting beyond it get 503 (with Retry-After)
    timeout_s: float = 60.0
    max_image_bytes: int = 20 * 2**20
    max_pixels: int = 50_000_000   # width x height, read from the header before decoding (a small file can be huge)
    max_decodes: int = 2           # images decoded at once: decoded memory is about max_decodes x 3 x max_pixels
    shutdown_timeout_s: float = 10.0   # after SIGTERM, open requests get this long before they are cut off
    decoding: Decoding = field(default_factory=Decoding)   # defaults for fields a request leaves out
    api_token: str | None = None   # when set, every request but GET /health-check needs it (Authorization header)

    def __post_init__(self) -> None:
        positive = {"max_batch_size": self.max_batch_size, "max_queue": self.max_queue, "timeout_s": self.timeout_s,
                    "max_image_bytes": self.max_image_bytes, "max_pixels": self.max_pixels,
                    "max_decodes": self.max_decodes, "shutdown_timeout_s": self.shutdown_timeout_s}
        for name, value in positive.items():
            if not value > 0:
                raise UsageError(f"{name} must be > 0, got {value}")
        if not self.max_wait_ms >= 0:
            raise UsageError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")

    @property
    def max_body_bytes(self) -> int:  # a base64 image is 4/3 of its bytes; room for the other fields
        return math.ceil(self.max_image_bytes * 4 / 3) + 2**20


# ---- request schemas ------------------------------------------------------------------------------------------------
class Fields(BaseModel):
    """Request fields: a field the schema does not name is refused (422 naming it), never ignored."""
    model_config = ConfigDict(extra="forbid")


class DecodingFields(Fields):
    """Sampling settings (temperature != 1, top_p < 1, top_k > 0) imply do_sample, with one beam
    (:func:`blip.generation.choose_search`)."""
    num_beams: int | None = Field(None, ge=1, le=32)
    max_new_tokens: int | None = Field(None, ge=1, le=512)
    min_new_tokens: int | None = Field(None, ge=0, le=512)
    do_sample: bool | None = None
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus mass (0.9 when sampling)")
    top_k: int | None = Field(None, ge=0, le=1000)
    temperature: float | None = Field(None, gt=0.0, le=10.0, description="sampling temperature (1 when sampling)")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    seed: int | None = Field(None, ge=0, lt=2**63)

    def decoding(self, defaults: Decoding) -> Decoding:
        """The server's defaults with the fields this request set (:meth:`Decoding.under`)."""
        return defaults.under(self.model_dump(include=self.model_fields_set & set(Decoding.__dataclass_fields__)))


class PredictionFields(Fields):
    """The hosted BLIP-2 inputs (besides ``image``)."""
    caption: bool = Field(False, description="caption the image instead of answering the question")
    question: str = Field(DEFAULT_QUESTION, description="question about the image; empty: caption it")
    context: str | None = Field(None, description='earlier turns, e.g. "Question: what is it? Answer: a cat."')
    use_nucleus_sampling: bool = Field(False, description="nucleus sampling (top_p 0.9) instead of beam search")
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="sampling temperature (other than 1: samples)")
    seed: int | None = Field(None, ge=0, lt=2**63, description="makes sampling reproducible (a blip extension)")


class BlipPredictionFields(Fields):
    """The hosted BLIP (v1) inputs (besides ``image``); the Cog protocol and the Replicate API take these for BLIP."""
    task: Literal["image_captioning", "visual_question_answering", "image_text_matching"] = "image_captioning"
    question: str | None = Field(None, description="the question (visual_question_answering)")
    caption: str | None = Field(None, description="the text to match with the image (image_text_matching)")


class CaptionFields(DecodingFields):
    prompt: str | None = None


class AnswerFields(DecodingFields):
    question: str = Field(..., min_length=1)
    context: str | None = None


class MatchFields(Fields):
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
    return _limited(raw, limit), validate_fields(schema, fields)


def _limited(raw: bytes | None, limit: int) -> bytes:
    if not raw:
        raise HTTPException(422, "image is required (a file field named image, or base64 in JSON)")
    if len(raw) > limit:
        raise HTTPException(413, f"image is {len(raw)} bytes; the limit is {limit}")
    return raw


COG_REQUEST_FIELDS = frozenset({"input", "id", "created_at", "context", "output_file_prefix", "webhook",
                                "webhook_events_filter"})   # Cog's PredictionRequest


def refuse_unknown(body: dict, known: frozenset[str], what: str) -> None:
    """422 naming the first field of ``body`` outside ``known``: an unknown field is refused, never ignored."""
    unknown = sorted(set(body) - known)
    if unknown:
        raise HTTPException(422, f"unknown field {unknown[0]!r} in the {what}; it takes {', '.join(sorted(known))}")


def validate_fields(schema: type[BaseModel], fields: dict) -> BaseModel:
    """The request's fields as ``schema`` (422 with pydantic's reasons)."""
    try:
        return schema.model_validate(fields)
    except ValidationError as e:
        raise HTTPException(422, json.loads(e.json(include_url=False))) from None


def image_input(value: Any, limit: int) -> bytes:
    """The ``image`` of a JSON input object (base64 or a data URI) -> bytes, checked as request images are."""
    if value is not None and not isinstance(value, str):
        raise HTTPException(400, "image must be a base64 string or a data URI")
    return _limited(_image_from_text(value) if value else None, limit)


def echo_input(inputs: dict) -> dict:
    """A prediction's input as the client sent it, an inline image shortened to its length: predictions are kept
    in memory and returned on every poll."""
    image = inputs.get("image")
    if isinstance(image, str) and len(image) > 64 and "://" not in image:
        return {**inputs, "image": f"{image[:40]}... ({len(image)} characters)"}
    return inputs


def iso_time(t: float | None) -> str | None:
    """Seconds since the epoch -> ISO 8601 in UTC, as the Replicate API and Cog write times."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


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


UNAUTHENTICATED = {"title": "Unauthenticated", "detail": "You did not pass a valid authentication token",
                   "status": 401}


class TokenAuth:
    """ASGI middleware: the Replicate API's 401 unless the request carries ``Authorization: Bearer <token>`` (or
    ``Token <token>``); nothing is read or run before the check. GET ``/health-check`` (Cog's liveness probe, which
    says only READY / BUSY) stays open."""

    OPEN = {"/health-check"}

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (scope["method"] == "GET" and scope["path"] in self.OPEN):
            return await self.app(scope, receive, send)
        scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        if scheme.lower() in (b"bearer", b"token") and hmac.compare_digest(given.strip(), self.token):
            return await self.app(scope, receive, send)
        response = JSONResponse(UNAUTHENTICATED, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await response(scope, receive, send)


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
    started: float | None = None   # time.time() when its batch went to the device

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
        self.enqueue(job)
        return await self.result(job)

    def enqueue(self, job: Job) -> None:
        """Queue ``job`` now (503 when the queue is full); :meth:`result` waits for it."""
        job.future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise HTTPException(503, f"busy: {self.cfg.max_queue} requests are waiting; retry later",
                                headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    async def result(self, job: Job) -> Any:
        """The queued job's result (504 after ``timeout_s``)."""
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.cfg.timeout_s)
        except asyncio.TimeoutError:
            job.future.cancel()
            raise HTTPException(504, f"no result within {self.cfg.timeout_s} s") from None

    def cancel(self, job: Job) -> bool:
        """Drop a job that has not reached the device (it never runs); False once its batch has started."""
        if job.started is not None or job.future is None or job.future.done():
            return False
        job.future.cancel()
        return True

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
                jobs = [job for job in jobs if not job.future.done()]   # canceled while the group waited
                if not jobs:
                    continue
                started = time.time()
                for job in jobs:
                    job.started = started
                self.running = len(jobs)
                try:
                    results = await asyncio.get_running_loop().run_in_executor(self.device_thread, self._run_apart,
                                                                               jobs)
                finally:
                    self.running = 0
                    self.batches += 1
                for job, result in zip(jobs, results):
                    if not job.future.done():
                        (job.future.set_exception if isinstance(result, Exception) else job.future.set_result)(result)

    def _run_apart(self, jobs: list[Job]) -> list:
        """The jobs' results as one batch; if the batch fails, each job alone, so only the requests that fail on
        their own get an exception (one per job) and the others their results."""
        try:
            return self._run(jobs)
        except Exception as e:  # noqa: BLE001 - one failed batch must not stop the server or fail its neighbours
            if len(jobs) == 1:
                log.exception("a %s request failed", jobs[0].kind)
                return [e]
            log.warning("batch of %d %s requests failed (%s: %s); running them one by one", len(jobs), jobs[0].kind,
                        type(e).__name__, e)
        return [self._run_apart([job])[0] for job in jobs]

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
def _openapi_body(schema: type[BaseModel], envelope: bool = False) -> dict:
    """Request body documentation for the two accepted encodings (and Cog's ``{"input": ...}``)."""
    fields = schema.model_json_schema()
    form = {**fields, "properties": {"image": {"type": "string", "format": "binary"}, **fields.get("properties", {})},
            "required": ["image", *fields.get("required", [])]}
    js = {**fields, "properties": {"image": {"type": "string", "description": "base64 or a data URI"},
                                   **fields.get("properties", {})}, "required": form["required"]}
    if envelope:
        js = {"oneOf": [js, {"title": "PredictionRequest", "type": "object", "required": ["input"],
                             "properties": {"input": {"$ref": "#/components/schemas/Input"}}}]}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form},
                                                          "application/json": {"schema": js}}}}


def cog_input_schema(fields: type[BaseModel]) -> dict:
    """Cog's ``Input`` schema for the hosted fields: ``image`` first, then the fields in order (``x-order``)."""
    props = {"image": {"type": "string", "format": "uri", "title": "Image",
                       "description": "the image: a data URI (the server fetches no URL)"}}
    for name, prop in fields.model_json_schema()["properties"].items():
        prop = dict(prop)
        options = [p for p in prop.pop("anyOf", []) if p.get("type") != "null"]
        prop.update(options[0] if options else {})   # `str | None`: a string that may be left out
        props[name] = prop
    for i, prop in enumerate(props.values()):
        prop["x-order"] = i
    return {"title": "Input", "type": "object", "required": ["image"], "properties": props}


def _matched(scores: list[dict]) -> str:
    """The hosted BLIP's image_text_matching output."""
    return (f"The image and text is matched with a probability of {scores[0]['itm']:.4f}.\n"
            f"The image feature and text feature has a cosine similarity of {scores[0]['itc']:.4f}.")


@dataclass
class HostedCall:
    """A request in a hosted model's schema as a batcher job, and how its result becomes that model's output."""
    job: Job
    finish: Callable[[Any], str] = str


class Service:
    """What the routes share: the model, the limits, the batcher and the image transform."""

    def __init__(self, predictor: Predictor, cfg: ServeConfig):
        self.predictor, self.cfg = predictor, cfg
        self.batcher = Batcher(predictor, cfg)
        self.transform = predictor.transform()
        self.decode_slots: asyncio.Semaphore | None = None   # made on the server's event loop by start()

    def start(self) -> None:
        """On the server's event loop: the decode slots and the batcher's worker."""
        self.decode_slots = asyncio.Semaphore(self.cfg.max_decodes)
        self.batcher.start()

    async def read(self, request: Request, schema: type[BaseModel]) -> tuple[bytes, BaseModel]:
        return await read_request(request, schema, self.cfg.max_image_bytes)

    def _decode(self, raw: bytes) -> torch.Tensor:
        """Image bytes -> pixels [3, S, S], the pixel count checked from the header before decoding; freed memory
        goes back to the system after a large image."""
        from .data.images import ImageDecodeError, ImageTooLargeError, load_image
        try:
            image = load_image(raw, max_pixels=self.cfg.max_pixels, limit_name="the server's --max-pixels")
        except ImageTooLargeError as e:
            raise HTTPException(413, f"image: {e.reason}") from None
        except ImageDecodeError as e:
            raise HTTPException(400, f"image: {e.reason}") from None
        large = image.width * image.height > LARGE_IMAGE_PIXELS
        try:
            return self.transform(image)
        finally:
            del image
            if large:
                release_memory()

    async def decode(self, raw: bytes) -> torch.Tensor:
        """Image bytes -> pixels, off the event loop and at most ``max_decodes`` at once (each holds its full
        decoded image); 413 / 400 for oversized or undecodable images."""
        async with self.decode_slots:
            return await asyncio.to_thread(self._decode, raw)

    async def run(self, job: Job, raw: bytes) -> Any:
        """Decode off the event loop, then wait for the job's batch."""
        job.pixels = await self.decode(raw)
        return await self.batcher.submit(job)

    # ---- the hosted models' schema (Cog and the Replicate API) -----------------------------------------------------
    @property
    def hosted_fields(self) -> type[BaseModel]:
        """The inputs of the hosted model this one stands in for: salesforce/blip for BLIP, else salesforce/blip-2."""
        return BlipPredictionFields if self.predictor.family == "blip" else PredictionFields

    def hosted(self, f: BaseModel) -> HostedCall:
        """Hosted inputs -> the job and its output string (422 for a task or setting this model cannot do)."""
        check, defaults = self.predictor.check, self.cfg.decoding
        if isinstance(f, BlipPredictionFields):
            if f.task == "image_captioning":
                check("caption", defaults)
                return HostedCall(Job("caption", None, defaults), lambda out: f"Caption: {out}")
            if f.task == "visual_question_answering":
                if not f.question:
                    raise HTTPException(422, "visual_question_answering needs a question")
                check("answer", defaults, question=f.question)
                return HostedCall(Job("answer", None, defaults, f.question), lambda out: f"Answer: {out}")
            if not f.caption:
                raise HTTPException(422, "image_text_matching needs a caption")
            check("match")
            return HostedCall(Job("match", None, texts=[f.caption]), _matched)
        given = f.model_fields_set   # the hosted switch and temperature, as far as the request set them
        decoding = defaults.under({**({"do_sample": f.use_nucleus_sampling} if "use_nucleus_sampling" in given else {}),
                                   **({"temperature": f.temperature} if "temperature" in given else {})})
        if f.caption or not f.question.strip():
            check("caption", decoding)
            return HostedCall(Job("caption", None, decoding, seed=f.seed))
        check("answer", decoding, f.context, f.question)
        return HostedCall(Job("answer", None, decoding, f.question, f.context, seed=f.seed))

    async def predict_cog(self, body: dict, prefer: str) -> dict:
        """Cog's ``POST /predictions`` with ``{"input": {...}}``, answered synchronously as Cog does."""
        refuse_unknown(body, COG_REQUEST_FIELDS, "Cog prediction request")
        if body.get("webhook") or "respond-async" in prefer.lower():
            raise HTTPException(422, "asynchronous Cog predictions (webhook, Prefer: respond-async) are not served; "
                                     "the Replicate API (POST /v1/predictions) takes webhooks")
        inputs = dict(body["input"])
        raw = image_input(inputs.pop("image", None), self.cfg.max_image_bytes)
        call = self.hosted(validate_fields(self.hosted_fields, inputs))
        created = time.time()
        output = call.finish(await self.run(call.job, raw))
        done = time.time()
        return {"id": body.get("id"), "input": echo_input(body["input"]), "output": output, "status": "succeeded",
                "error": None, "logs": "", "created_at": iso_time(created), "started_at": iso_time(call.job.started),
                "completed_at": iso_time(done), "metrics": {"predict_time": done - call.job.started}}

    def health(self) -> dict:
        p, b = self.predictor, self.batcher
        return {"status": "ok", "model": p.name, "class": type(p.model).__name__, "tasks": list(p.tasks),
                "device": str(p.device), "dtype": str(p.dtype).removeprefix("torch."), "queued": b.queue.qsize(),
                "running": b.running, "batches": b.batches, "max_batch_size": self.cfg.max_batch_size}


def create_app(predictor: Predictor, cfg: ServeConfig | None = None) -> FastAPI:
    """The app: the routes above, batching, body limits and (with ``cfg.api_token``) the token check.
    :func:`blip.serve_replicate.create_app` adds the Replicate HTTP API to it."""
    from contextlib import asynccontextmanager

    service = Service(predictor, cfg or ServeConfig())

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        service.batcher.task.cancel()
        service.batcher.device_thread.shutdown(wait=False)

    app = FastAPI(title="blip", description=__doc__, lifespan=lifespan)
    app.state.service = service
    app.add_middleware(BodyLimit, limit=service.cfg.max_body_bytes)
    if service.cfg.api_token:
        app.add_middleware(TokenAuth, token=service.cfg.api_token)   # added last: runs first

    @app.exception_handler(UsageError)
    async def unusable(request: Request, e: UsageError) -> JSONResponse:  # a task or setting this model cannot do
        return JSONResponse({"detail": str(e)}, status_code=422)

    _add_routes(app, service)
    default_openapi = app.openapi

    def openapi() -> dict:   # Cog's schema names: Input (the hosted model's fields) and Output
        schema = default_openapi()
        schema.setdefault("components", {}).setdefault("schemas", {}).update(
            Input=cog_input_schema(service.hosted_fields), Output={"title": "Output", "type": "string"})
        return schema

    app.openapi = openapi
    return app


async def _cog_envelope(request: Request) -> dict | None:
    """A Cog prediction request's body (a JSON object with an ``input`` object), or None for the other forms."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        return None
    try:
        body = json.loads(await request.body())   # the body is cached: read_request reads it again
    except ValueError:
        return None   # read_request names the problem
    return body if isinstance(body, dict) and isinstance(body.get("input"), dict) else None


def _add_routes(app: FastAPI, service: Service) -> None:
    check, defaults = service.predictor.check, service.cfg.decoding

    @app.get("/health")
    async def health() -> dict:
        return service.health()

    @app.get("/health-check")
    async def health_check() -> dict:
        """Cog's health check: READY, or BUSY while the queue is full."""
        return {"status": "BUSY" if service.batcher.queue.full() else "READY", "setup": {"status": "succeeded"}}

    @app.post("/predictions", openapi_extra=_openapi_body(PredictionFields, envelope=True))
    async def predictions(request: Request) -> dict:
        envelope = await _cog_envelope(request)
        if envelope is not None:
            return await service.predict_cog(envelope, request.headers.get("prefer", ""))
        raw, f = await service.read(request, PredictionFields)
        call = service.hosted(f)
        return {"output": call.finish(await service.run(call.job, raw))}

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
        check("answer", decoding, f.context, f.question)
        return {"answer": await service.run(Job("answer", None, decoding, f.question, f.context, seed=f.seed), raw)}

    @app.post("/match", openapi_extra=_openapi_body(MatchFields))
    async def match(request: Request) -> dict:
        raw, f = await service.read(request, MatchFields)
        check("match")
        return {"scores": await service.run(Job("match", None, texts=f.texts), raw)}


def run_app(app: FastAPI, host: str, port: int) -> None:
    """Serve ``app`` with uvicorn until interrupted. On SIGTERM / Ctrl-C open requests get the config's
    ``shutdown_timeout_s``; then they are cut off (a client holding a half-sent body cannot keep the server up)."""
    import sys

    import uvicorn
    # The device thread holds the GIL between kernels; hand it over sooner so /health and request parsing stay
    # responsive while a batch runs (Python's default is 5 ms per hand-over).
    sys.setswitchinterval(0.0005)
    uvicorn.run(app, host=host, port=port, log_level="info",
                timeout_graceful_shutdown=app.state.service.cfg.shutdown_timeout_s)


def serve(predictor: Predictor, host: str = "127.0.0.1", port: int = 8000, cfg: ServeConfig | None = None) -> None:
    run_app(create_app(predictor, cfg), host, port)
