"""The Replicate HTTP API on ``blip serve``: code written for the hosted model runs against this server once the
client's base URL points here (Python ``replicate.Client(base_url="http://HOST:PORT")``, Node
``new Replicate({baseUrl: "http://HOST:PORT/v1"})``); nothing else changes.

Served: the subset the ``replicate`` clients (Python, Node) use for ``run``, ``predictions.create`` / ``get`` /
``cancel`` / ``list``, ``wait`` and file inputs.

- ``POST /v1/predictions`` (``version``: an id, ``owner/name`` or ``owner/name:id``) and
  ``POST /v1/models/{owner}/{name}/predictions`` -> 201 and the prediction object. ``Prefer: wait[=N]`` holds the
  answer until the prediction ends or N seconds pass (1-60, ``wait`` alone 60); an unfinished prediction is then
  reported as ``starting``, which is what the clients take as "poll on" (as Replicate answers).
- ``GET /v1/predictions/{id}``, ``POST /v1/predictions/{id}/cancel`` (a queued prediction is dropped before it runs;
  a running batch finishes and its output is discarded), ``GET /v1/predictions``.
- ``GET /v1/models/{owner}/{name}`` and ``.../versions/{id}`` (the version's OpenAPI schema: Cog's Input / Output).
- ``POST /v1/files`` (the clients' upload of file inputs), ``GET /v1/files``, ``GET`` / ``DELETE /v1/files/{id}``:
  the bytes stay in memory (bounded; oldest evicted). A prediction input may name an upload by the URL this server
  returned for it; that, a data URI or base64 are the only image inputs: the server fetches nothing.

The model answers as ``salesforce/blip-2`` (BLIP-2 models) or ``salesforce/blip`` (BLIP) with any version id, or as
:class:`ModelRef` says; other models get 404. Inputs and outputs are the hosted model's (see
:meth:`blip.serve.Service.hosted`). Predictions run through the server's batcher, so its batching, queue limit
(503) and timeout (the prediction fails) apply; finished predictions are kept in memory up to ``max_predictions``.
Webhooks (``webhook``, ``webhook_events_filter``: start / output / logs / completed; ``webhook_completed``) go only to
hosts on the allow-list (``ApiConfig.webhook_hosts``, exact host names; empty by default: a request with a webhook
gets 422); deliveries run in the background, retried with exponential backoff. Errors are the API's problem details
(``{"title", "detail", "status"}``).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Callable
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .predictor import Predictor, UsageError
from .serve import (Job, ServeConfig, Service, create_app as create_base_app, echo_input, image_input, iso_time,
                    refuse_unknown, run_app, validate_fields)

log = logging.getLogger("blip.serve")

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
VERSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
EVENTS = frozenset({"start", "output", "logs", "completed"})
COG_VERSION = "0.9.0+blip"   # the Cog protocol generation these schemas follow; "+blip": not Cog itself
MAX_WAIT_S = 60
# the body fields of a create request the API (and the Python and Node clients) may send, besides `version`
CREATE_FIELDS = frozenset({"input", "webhook", "webhook_completed", "webhook_events_filter", "stream"})


@dataclass(frozen=True)
class ModelRef:
    """``owner/name[:version]``: the model the API answers as; without a version, any version id is accepted."""
    owner: str
    name: str
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        owner, _, rest = text.partition("/")
        name, _, version = rest.partition(":")
        if not (NAME.fullmatch(owner) and NAME.fullmatch(name) and (not version or VERSION_ID.fullmatch(version))):
            raise ValueError(f"model reference {text!r} is not OWNER/NAME or OWNER/NAME:VERSION")
        return cls(owner, name, version or None)

    @property
    def model(self) -> str:
        return f"{self.owner}/{self.name}"

    def __str__(self) -> str:
        return self.model + (f":{self.version}" if self.version else "")


def default_ref(predictor: Predictor) -> ModelRef:
    """The hosted model this one stands in for: salesforce/blip for BLIP, salesforce/blip-2 otherwise."""
    return ModelRef("salesforce", "blip" if predictor.family == "blip" else "blip-2")


@dataclass
class ApiConfig:
    model_ref: ModelRef | None = None          # None: default_ref(predictor)
    webhook_hosts: frozenset[str] = frozenset()  # exact host names webhooks may go to; empty: no webhooks
    max_predictions: int = 1000                # finished predictions kept (oldest evicted first)
    max_upload_bytes: int = 256 * 2**20        # uploaded files kept in memory, in all (oldest evicted first)
    webhook_attempts: int = 5
    webhook_backoff_s: float = 1.0             # 1, 2, 4, 8 s between attempts
    webhook_timeout_s: float = 10.0


def problem(status: int, detail: Any) -> JSONResponse:
    """The Replicate API's error body (RFC 7807 problem details)."""
    if isinstance(detail, list):   # pydantic's reasons
        detail = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in detail)
    return JSONResponse({"title": HTTPStatus(status).phrase, "detail": str(detail), "status": status},
                        status_code=status)


def _new_id() -> str:
    return secrets.token_bytes(16).hex()[:26]


def prefer_wait(header: str | None) -> float | None:
    """Seconds to hold a create request from ``Prefer: wait`` (60) or ``wait=N`` (1-60); None without it."""
    for token in (header or "").split(","):
        name, _, value = token.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                return float(min(max(int(value), 1), MAX_WAIT_S)) if value.strip() else float(MAX_WAIT_S)
            except ValueError:
                raise HTTPException(422, f"Prefer: wait={value} is not a number of seconds") from None
    return None


# ---- predictions ----------------------------------------------------------------------------------------------------
@dataclass
class Prediction:
    id: str
    model: str
    version: str
    input: dict
    job: Job
    finish: Callable[[Any], str]
    base: str                                          # the URL the client reached the server at
    hooks: list[tuple[str, frozenset[str]]] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    state: str | None = None                           # succeeded / failed / canceled once finished
    output: str | None = None
    error: str | None = None
    completed: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None

    @property
    def status(self) -> str:
        return self.state or ("processing" if self.job.started is not None else "starting")

    def to_json(self, sync: bool = False) -> dict:
        """The prediction object; ``sync``: the answer to a ``Prefer: wait`` create, where an unfinished prediction
        is "starting" (the clients poll only then)."""
        started, url = self.job.started, f"{self.base}/v1/predictions/{self.id}"
        metrics = {}
        if self.completed is not None:
            metrics = {"total_time": self.completed - self.created}
            if started is not None:
                metrics["predict_time"] = self.completed - started
        return {"id": self.id, "model": self.model, "version": self.version, "input": self.input,
                "output": self.output, "error": self.error, "logs": "",
                "status": "starting" if sync and self.state is None else self.status, "data_removed": False,
                "created_at": iso_time(self.created), "started_at": iso_time(started),
                "completed_at": iso_time(self.completed), "urls": {"get": url, "cancel": f"{url}/cancel"},
                "metrics": metrics}


class PredictionStore:
    """Predictions by id, in creation order; beyond ``limit`` the oldest finished ones are dropped."""

    def __init__(self, limit: int):
        self.limit, self.items = limit, OrderedDict()

    def add(self, p: Prediction) -> None:
        self.items[p.id] = p
        for old in [k for k, v in self.items.items() if v.state is not None][:max(0, len(self.items) - self.limit)]:
            del self.items[old]

    def get(self, id: str) -> Prediction:
        if id not in self.items:
            raise HTTPException(404, f"prediction {id} not found")
        return self.items[id]


# ---- uploads --------------------------------------------------------------------------------------------------------
@dataclass
class Upload:
    id: str
    url: str
    name: str
    content_type: str
    data: bytes
    metadata: dict
    created: float = field(default_factory=time.time)

    def to_json(self) -> dict:
        digest = hashlib.sha256(self.data).hexdigest()
        return {"id": self.id, "name": self.name, "content_type": self.content_type, "size": len(self.data),
                "etag": digest[:32], "checksums": {"sha256": digest}, "metadata": self.metadata,
                "created_at": iso_time(self.created), "expires_at": None, "urls": {"get": self.url}}


class UploadStore:
    """Uploaded files in memory, ``limit`` bytes in all (oldest evicted first)."""

    PATH = re.compile(r"(?:/.*)?/v1/files/([A-Za-z0-9_-]+)")

    def __init__(self, limit: int):
        self.limit, self.items = limit, OrderedDict()

    def add(self, upload: Upload) -> None:
        self.items[upload.id] = upload
        while sum(len(u.data) for u in self.items.values()) > self.limit and len(self.items) > 1:
            self.items.popitem(last=False)

    def get(self, id: str) -> Upload:
        if id not in self.items:
            raise HTTPException(404, f"file {id} not found")
        return self.items[id]

    def resolve(self, value: str) -> bytes | None:
        """The bytes of an upload named by the URL this server gave it; None for anything not shaped like one."""
        if not value.startswith(("http://", "https://")):
            return None
        found = self.PATH.fullmatch(urlsplit(value).path)
        if found is None:
            return None
        upload = self.items.get(found[1])
        if upload is None or upload.url != value:
            raise HTTPException(422, f"{value} is not a file uploaded to this server (or it was evicted): upload "
                                     "it again; the server fetches no URL")
        return upload.data


# ---- webhooks -------------------------------------------------------------------------------------------------------
class Webhooks:
    """Checks webhook targets against the allow-list and delivers events in the background, with retries."""

    def __init__(self, cfg: ApiConfig):
        self.cfg, self.hosts = cfg, {h.lower() for h in cfg.webhook_hosts}
        self.pending: set[asyncio.Task] = set()   # held so running deliveries are not garbage-collected

    def targets(self, body: dict) -> list[tuple[str, frozenset[str]]]:
        """The request's webhooks as (url, events); 422 for a host not on the allow-list or unknown events."""
        events = body.get("webhook_events_filter")
        if events is not None and not (isinstance(events, list) and set(events) <= EVENTS):
            raise HTTPException(422, f"webhook_events_filter must be a list of {', '.join(sorted(EVENTS))}")
        wanted = [(body.get("webhook"), frozenset(events or EVENTS)), (body.get("webhook_completed"),
                                                                       frozenset({"completed"}))]
        out = []
        for url, kinds in wanted:
            if url is None:
                continue
            parts = urlsplit(url) if isinstance(url, str) else None
            if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
                raise HTTPException(422, f"webhook {url!r} is not an http(s) URL")
            if parts.hostname.lower() not in self.hosts:
                raise HTTPException(422, f"webhook host {parts.hostname} is not allowed: this server sends webhooks "
                                         "only to the hosts given with --webhook-host")
            out.append((url, kinds))
        return out

    def send(self, p: Prediction, event: str) -> None:
        for url, kinds in p.hooks:
            if event in kinds or (event == "completed" and "output" in kinds):   # the output arrives at the end
                task = asyncio.get_running_loop().create_task(self._deliver(url, p.to_json()))
                self.pending.add(task)
                task.add_done_callback(self.pending.discard)

    async def _deliver(self, url: str, payload: dict) -> None:
        import httpx
        async with httpx.AsyncClient(timeout=self.cfg.webhook_timeout_s, follow_redirects=False,
                                     trust_env=False) as client:
            for attempt in range(self.cfg.webhook_attempts):
                try:
                    if (await client.post(url, json=payload)).is_success:
                        return
                except httpx.HTTPError:
                    pass
                if attempt + 1 < self.cfg.webhook_attempts:
                    await asyncio.sleep(self.cfg.webhook_backoff_s * 2 ** attempt)
        log.warning("webhook %s for prediction %s: no 2xx answer after %d attempts", url, payload["id"],
                    self.cfg.webhook_attempts)


# ---- the API --------------------------------------------------------------------------------------------------------
class ReplicateApi:
    """The prediction and upload stores, the model reference and the webhooks, over the server's :class:`Service`."""

    def __init__(self, service: Service, cfg: ApiConfig):
        self.service, self.cfg = service, cfg
        self.ref = cfg.model_ref or default_ref(service.predictor)
        # a stable id for this model where the reference names none
        self.version = self.ref.version or hashlib.sha256(f"blip:{service.predictor.name}".encode()).hexdigest()
        self.predictions = PredictionStore(cfg.max_predictions)
        self.uploads = UploadStore(cfg.max_upload_bytes)
        self.webhooks = Webhooks(cfg)
        self.started = time.time()

    def version_for(self, owner: str, name: str, version: str | None = None) -> str:
        """The version id a request for ``owner/name[:version]`` runs as; the API's 404 for another model."""
        if (owner.lower(), name.lower()) != (self.ref.owner.lower(), self.ref.name.lower()):
            raise HTTPException(404, f"model {owner}/{name} not found: this server runs {self.ref.model}")
        if version is None:
            return self.version
        if not VERSION_ID.fullmatch(version):
            raise HTTPException(422, f"{version!r} is not a version id")
        if self.ref.version and version != self.ref.version:
            raise HTTPException(404, f"version {version} of {self.ref.model} not found: this server runs "
                                     f"{self.ref.version}")
        return version

    def version_of(self, text: Any) -> str:
        """``version`` of POST /v1/predictions: an id, ``owner/name`` or ``owner/name:id``."""
        if not isinstance(text, str) or not text:
            raise HTTPException(422, "version is required: a version id, owner/name or owner/name:id")
        if "/" not in text:
            return self.version_for(self.ref.owner, self.ref.name, text)
        try:
            ref = ModelRef.parse(text)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return self.version_for(ref.owner, ref.name, ref.version)

    def image(self, value: Any) -> bytes:
        """The image input: one of this server's uploads (by its URL), a data URI or base64."""
        if isinstance(value, str) and (data := self.uploads.resolve(value)) is not None:
            return data
        return image_input(value, self.service.cfg.max_image_bytes)

    async def create(self, request: Request, body: dict, version: str) -> JSONResponse:
        """Validate, queue and (with ``Prefer: wait``) wait: both create routes."""
        refuse_unknown(body, CREATE_FIELDS | ({"version"} if request.url.path == "/v1/predictions" else set()),
                       "prediction request")
        if body.get("stream"):
            raise HTTPException(422, "streaming output (stream: true) is not served: poll the prediction or use "
                                     "Prefer: wait")
        hooks = self.webhooks.targets(body)   # refused before anything else happens
        wait = prefer_wait(request.headers.get("prefer"))
        inputs = body.get("input", {})
        if not isinstance(inputs, dict):
            raise HTTPException(422, "input must be an object")
        raw = self.image(inputs.get("image"))
        fields = {k: v for k, v in inputs.items() if k != "image"}
        call = self.service.hosted(validate_fields(self.service.hosted_fields, fields))
        call.job.pixels = await self.service.decode(raw)
        self.service.batcher.enqueue(call.job)   # 503 when the queue is full
        p = Prediction(_new_id(), self.ref.model, version, echo_input(inputs), call.job, call.finish,
                       str(request.base_url).rstrip("/"), hooks)
        self.predictions.add(p)
        p.task = asyncio.get_running_loop().create_task(self._complete(p))
        self.webhooks.send(p, "start")
        if wait is not None:
            try:
                await asyncio.wait_for(p.done.wait(), wait)
            except asyncio.TimeoutError:
                pass
        return JSONResponse(p.to_json(sync=wait is not None), status_code=201)

    async def _complete(self, p: Prediction) -> None:
        try:
            p.output = p.finish(await self.service.batcher.result(p.job))
            p.state = "succeeded"
        except HTTPException as e:   # 504: no result within the server's timeout
            p.state, p.error = "failed", str(e.detail)
        except Exception as e:  # noqa: BLE001 - the model's failure is the prediction's, not the server's
            log.exception("prediction %s failed", p.id)
            p.state, p.error = "failed", f"{type(e).__name__}: {e}"
        finally:   # also when canceled (cancel() set the state first)
            p.completed = p.completed or time.time()
            p.job.pixels = None
            p.done.set()
            if p.state is not None:
                self.webhooks.send(p, "completed")

    def cancel(self, p: Prediction) -> None:
        if p.state is None:
            p.state, p.completed = "canceled", time.time()
            self.service.batcher.cancel(p.job)   # queued: dropped before it runs
            p.task.cancel()


async def _json_object(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError as e:
        raise HTTPException(400, f"malformed JSON body ({e})") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the body must be a JSON object")
    return body


def add_replicate_api(app: FastAPI, service: Service, cfg: ApiConfig | None = None) -> ReplicateApi:
    """Add the ``/v1`` routes to a :func:`blip.serve.create_app` app; its errors become problem details."""
    api = ReplicateApi(service, cfg or ApiConfig())
    app.state.replicate = api

    def is_api(request: Request) -> bool:
        return request.url.path.startswith("/v1/")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        if not is_api(request):
            return await http_exception_handler(request, e)
        response = problem(e.status_code, e.detail)
        response.headers.update(e.headers or {})   # e.g. a 503's Retry-After
        return response

    @app.exception_handler(UsageError)
    async def unusable(request: Request, e: UsageError) -> JSONResponse:
        return problem(422, str(e)) if is_api(request) else JSONResponse({"detail": str(e)}, status_code=422)

    @app.post("/v1/predictions", status_code=201)
    async def create(request: Request) -> JSONResponse:
        body = await _json_object(request)
        return await api.create(request, body, api.version_of(body.get("version")))

    @app.post("/v1/models/{owner}/{name}/predictions", status_code=201)
    async def create_for_model(owner: str, name: str, request: Request) -> JSONResponse:
        version = api.version_for(owner, name)
        return await api.create(request, await _json_object(request), version)

    @app.get("/v1/predictions/{id}")
    async def get(id: str) -> dict:
        return api.predictions.get(id).to_json()

    @app.post("/v1/predictions/{id}/cancel")
    async def cancel(id: str) -> dict:
        p = api.predictions.get(id)
        api.cancel(p)
        return p.to_json()

    @app.get("/v1/predictions")
    async def list_predictions() -> dict:
        return {"previous": None, "next": None,
                "results": [p.to_json() for p in reversed(api.predictions.items.values())]}

    def version_json(version: str) -> dict:
        return {"id": version, "created_at": iso_time(api.started), "cog_version": COG_VERSION,
                "openapi_schema": app.openapi()}

    @app.get("/v1/models/{owner}/{name}")
    async def model(owner: str, name: str, request: Request) -> dict:
        version = api.version_for(owner, name)
        return {"url": f"{str(request.base_url).rstrip('/')}/v1/models/{api.ref.model}", "owner": api.ref.owner,
                "name": api.ref.name, "description": f"blip serve: {service.predictor.name}", "visibility": "private",
                "github_url": None, "paper_url": None, "license_url": None, "cover_image_url": None,
                "run_count": len(api.predictions.items), "default_example": None,
                "latest_version": version_json(version)}

    @app.get("/v1/models/{owner}/{name}/versions/{version}")
    async def model_version(owner: str, name: str, version: str) -> dict:
        return version_json(api.version_for(owner, name, version))

    @app.post("/v1/files", status_code=201)
    async def upload(request: Request) -> dict:
        try:
            form = await request.form()
        except Exception as e:  # noqa: BLE001 - the multipart parser's own error types
            raise HTTPException(400, f"malformed multipart body ({e})") from None
        content, metadata = form.get("content"), form.get("metadata")
        if not hasattr(content, "read"):
            raise HTTPException(422, "send the file as the multipart field content")
        data = await content.read()
        if len(data) > service.cfg.max_image_bytes:
            raise HTTPException(413, f"file is {len(data)} bytes; the limit is {service.cfg.max_image_bytes}")
        try:   # the Python client sends metadata as a field, the Node client as a JSON part
            metadata = json.loads(await metadata.read() if hasattr(metadata, "read") else metadata or "{}")
        except ValueError:
            raise HTTPException(422, "metadata must be JSON") from None
        id = _new_id()
        item = Upload(id, f"{str(request.base_url).rstrip('/')}/v1/files/{id}", content.filename or "file",
                      content.content_type or "application/octet-stream", data,
                      metadata if isinstance(metadata, dict) else {})
        api.uploads.add(item)
        return item.to_json()

    @app.get("/v1/files")
    async def list_files() -> dict:
        return {"previous": None, "next": None, "results": [u.to_json() for u in api.uploads.items.values()]}

    @app.get("/v1/files/{id}")
    async def get_file(id: str) -> dict:
        return api.uploads.get(id).to_json()

    @app.delete("/v1/files/{id}", status_code=204)
    async def delete_file(id: str) -> Response:
        api.uploads.get(id)
        del api.uploads.items[id]
        return Response(status_code=204)

    return api


def create_app(predictor: Predictor, cfg: ServeConfig | None = None, api: ApiConfig | None = None) -> FastAPI:
    """``blip serve``'s app: :func:`blip.serve.create_app` with the Replicate API."""
    app = create_base_app(predictor, cfg)
    add_replicate_api(app, app.state.service, api)
    return app


def serve(predictor: Predictor, host: str = "127.0.0.1", port: int = 8000, cfg: ServeConfig | None = None,
          api: ApiConfig | None = None) -> None:
    run_app(create_app(predictor, cfg, api), host, port)
