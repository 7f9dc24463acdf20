"""`blip serve` as the hosted model: the Replicate clients (Python, and Node where it is installed) run the hosted
guide's code against a real server on loopback (tiny BLIP-2 from the LAVIS fixture), with only the base URL changed;
every output is compared with the same call made directly through the model. Cog's local protocol, the token check,
model references, cancel, webhooks and the prediction store are checked too (in process where a stand-in is needed)."""
import base64
import json
import os
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import replicate

import blip
from serve_process import serve_process
from test_serve import HOT, MAX_NEW, blip2, direct, expected  # noqa: F401 - blip2, direct: fixtures used here

TOKEN = "test-token-7f3a"
HOSTED_VERSION = "f677695e5e89f8b236e52ecd1d3f01beb44c34606419bcc19345e046d8f786f9"   # any id is answered
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(blip2):  # noqa: F811
    """`blip serve` with an API token (from the environment), loopback only; always terminated."""
    args = ["--model", str(blip2["model"]), "--llm", str(blip2["llm"]), "--max-new-tokens", str(MAX_NEW),
            "--max-wait-ms", "20", "--timeout-s", "120"]
    with serve_process(args, env={"BLIP_SERVE_API_TOKEN": TOKEN}, headers=AUTH) as url:
        yield url


@pytest.fixture(scope="module")
def cat(fixtures):
    path = fixtures / "images" / "cat.jpg"
    return {"path": path, "uri": "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()}


def test_python_client_runs_the_guides_code(server, direct, cat):  # noqa: F811
    client = replicate.Client(api_token=TOKEN, base_url=server)   # the one change: where the API is
    client.poll_interval = 0.05
    path, uri = cat["path"], cat["uri"]
    with open(path, "rb") as image:   # an open file: the client uploads it to /v1/files and sends its URL
        out = client.run(f"salesforce/blip-2:{HOSTED_VERSION}", input={"image": image, "question": "what is it?"})
    assert out == expected(direct, path, "what is it?", None)
    out = client.run(f"salesforce/blip-2:{HOSTED_VERSION}", input={"image": uri, "caption": True})
    assert out == direct.caption(path, max_new_tokens=MAX_NEW)[0]
    sampled = {"image": uri, "question": "what color?", "use_nucleus_sampling": True, "temperature": HOT, "seed": 5}
    assert client.run("salesforce/blip-2", input=sampled) == expected(direct, path, "what color?", 5)

    prediction = client.predictions.create(version=HOSTED_VERSION, input={**sampled, "seed": 6})
    assert prediction.status in ("starting", "processing") and prediction.output is None
    prediction.wait()
    assert prediction.status == "succeeded" and prediction.error is None
    assert prediction.output == expected(direct, path, "what color?", 6)
    assert prediction.metrics["predict_time"] > 0 and prediction.completed_at >= prediction.created_at
    assert prediction.urls["get"] == f"{server}/v1/predictions/{prediction.id}"
    again = client.predictions.get(prediction.id)
    assert (again.model, again.version, again.output) == ("salesforce/blip-2", HOSTED_VERSION, prediction.output)
    assert again.input["question"] == "what color?"


@pytest.fixture(scope="module")
def node_replicate(tmp_path_factory):
    """(node, node_modules with the Node `replicate` client, installed from the npm registry): skipped here without
    node, a failure in CI."""
    def unavailable(reason: str):
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Node client test: {reason}")
        pytest.skip(reason)

    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        unavailable("the Node client test needs node and npm (apt-get install nodejs npm)")
    major = int(subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip().lstrip("v")
                .split(".")[0])
    if major < 18:
        unavailable(f"the Node replicate client needs Node >= 18 (fetch, FormData); this is {major}")
    folder = tmp_path_factory.mktemp("node-replicate")
    done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(folder), "replicate@1"],
                          capture_output=True, text=True, timeout=300)
    if done.returncode:
        unavailable(f"npm install replicate failed: {done.stderr[-1500:]}")
    return node, folder / "node_modules"


def test_node_client_runs_the_guides_code(server, direct, cat, node_replicate, tmp_path):  # noqa: F811
    node, modules = node_replicate
    path, uri = cat["path"], cat["uri"]
    sampled = {"image": uri, "question": "what color?", "use_nucleus_sampling": True, "temperature": HOT, "seed": 9}
    ref = f"salesforce/blip-2:{HOSTED_VERSION}"
    cases = [
        {"name": "file", "call": "run", "ref": ref, "input": {"image": {"file": str(path)}, "question": "what is it?"}},
        {"name": "caption", "call": "run", "ref": ref, "input": {"image": uri, "caption": True}},
        {"name": "sampled", "call": "run", "ref": "salesforce/blip-2", "input": sampled},
        {"name": "create", "call": "create", "version": HOSTED_VERSION, "input": {**sampled, "seed": 10}},
    ]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"baseUrl": f"{server}/v1", "auth": TOKEN, "cases": cases}))
    script = os.path.join(os.path.dirname(__file__), "replicate_node_client.cjs")
    done = subprocess.run([node, script, str(plan)], env={**os.environ, "NODE_PATH": str(modules)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == {
        "file": expected(direct, path, "what is it?", None),
        "caption": direct.caption(path, max_new_tokens=MAX_NEW)[0],
        "sampled": expected(direct, path, "what color?", 9),
        "create": {"status": "succeeded", "output": expected(direct, path, "what color?", 10)},
    }


def test_tokens_models_urls_and_webhooks_are_refused(server, cat):
    body = {"version": HOSTED_VERSION, "input": {"image": cat["uri"], "caption": True}}
    post = lambda path, json, headers=AUTH: httpx.post(f"{server}{path}", json=json, headers=headers,  # noqa: E731
                                                       timeout=60)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        r = post("/v1/predictions", body, headers)
        assert r.status_code == 401 and r.json()["title"] == "Unauthenticated", r.text
    for path in ("/health", "/predictions", "/v1/predictions"):   # every route but Cog's liveness probe
        assert httpx.request("GET" if path == "/health" else "POST", f"{server}{path}", timeout=30).status_code == 401
    assert httpx.get(f"{server}/health-check", timeout=30).json()["status"] == "READY"
    with pytest.raises(replicate.exceptions.ReplicateError) as e:
        replicate.Client(api_token="wrong", base_url=server).run("salesforce/blip-2", input=body["input"])
    assert e.value.status == 401

    client = replicate.Client(api_token=TOKEN, base_url=server)
    for ref in ("salesforce/blip", f"someone/else:{HOSTED_VERSION}"):
        with pytest.raises(replicate.exceptions.ReplicateError) as e:
            client.run(ref, input=body["input"])
        assert e.value.status == 404 and "salesforce/blip-2" in e.value.detail
    assert post("/v1/predictions", {**body, "version": "someone/else:1"}).status_code == 404

    # the server fetches nothing: URLs other than its own uploads are refused, as are webhooks (no allow-list)
    for image in ("https://example.com/cat.jpg", f"{server}/v1/files/not-an-upload", "file:///etc/passwd"):
        r = post("/v1/predictions", {**body, "input": {"image": image}})
        assert r.status_code in (400, 422) and "fetch" in r.json()["detail"], r.text
    r = post("/v1/predictions", {**body, "webhook": f"{server}/hook", "webhook_events_filter": ["completed"]})
    assert r.status_code == 422 and "not allowed" in r.json()["detail"]
    assert httpx.get(f"{server}/v1/predictions", headers=AUTH, timeout=30).status_code == 200


def test_cog_protocol(server, direct, cat):  # noqa: F811
    r = httpx.post(f"{server}/predictions", json={"input": {"image": cat["uri"], "question": "where is this?"}},
                   headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "succeeded" and body["error"] is None
    assert body["output"] == expected(direct, cat["path"], "where is this?", None)
    assert body["metrics"]["predict_time"] > 0
    schema = httpx.get(f"{server}/openapi.json", headers=AUTH, timeout=30).json()["components"]["schemas"]
    fields = schema["Input"]["properties"]
    assert list(fields) == ["image", "caption", "question", "context", "use_nucleus_sampling", "temperature", "seed"]
    assert [f["x-order"] for f in fields.values()] == list(range(7)) and schema["Input"]["required"] == ["image"]
    assert fields["question"]["default"] == "What is this a picture of?" and fields["context"]["type"] == "string"
    assert schema["Output"] == {"title": "Output", "type": "string"}
    r = httpx.post(f"{server}/predictions", json={"input": {"image": cat["uri"]}, "webhook": "http://127.0.0.1/x"},
                   headers=AUTH, timeout=60)
    assert r.status_code == 422 and "asynchronous" in r.json()["detail"]


# ---- in process ------------------------------------------------------------------------------------------------------
@pytest.fixture
def blip_captioner():
    from tiny_weights import randomize

    model = blip.create_model("blip_tiny", "caption")
    randomize(model, seed=3)
    return model.eval()


def _poll(client, id: str, status: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while (body := client.get(f"/v1/predictions/{id}").json())["status"] != status:
        assert time.monotonic() < deadline, body
        time.sleep(0.02)
    return body


def test_cancel_drops_a_queued_prediction_and_wait_returns_it_in_progress(blip_captioner, cat, one_thread):
    """A stand-in holds the first batch on the device: a queued prediction, canceled, never runs; ``Prefer: wait=1``
    answers after a second with the unfinished prediction (as "starting", the clients' cue to poll)."""
    from fastapi.testclient import TestClient

    from blip.predictor import Predictor
    from blip.serve import ServeConfig
    from blip.serve_replicate import create_app

    predictor, gate, batches = Predictor(blip_captioner, "cap"), threading.Event(), []
    caption = predictor.caption

    def held(pixels, decoding, seeds):
        batches.append(pixels.shape[0])
        assert gate.wait(60)
        return caption(pixels, decoding, seeds)

    predictor.caption = held
    body = {"input": {"image": cat["uri"]}}   # the hosted BLIP's default task: image_captioning
    with TestClient(create_app(predictor, ServeConfig(max_wait_ms=0))) as client:
        first = client.post("/v1/models/salesforce/blip/predictions", json=body).json()
        _poll(client, first["id"], "processing")
        queued = client.post("/v1/predictions", json={**body, "version": "salesforce/blip:v1"}).json()
        assert queued["status"] == "starting" and queued["version"] == "v1"
        canceled = client.post(f"/v1/predictions/{queued['id']}/cancel").json()
        assert canceled["status"] == "canceled" and canceled["completed_at"] and canceled["output"] is None

        start = time.monotonic()
        waited = client.post("/v1/models/salesforce/blip/predictions", json=body, headers={"Prefer": "wait=1"})
        assert waited.status_code == 201 and waited.json()["status"] == "starting"
        assert 1 <= time.monotonic() - start < 10
        client.post(f"/v1/predictions/{waited.json()['id']}/cancel")

        gate.set()
        done = _poll(client, first["id"], "succeeded")
        assert done["output"] == "Caption: " + blip_captioner.caption(cat["path"])[0]
        deadline = time.monotonic() + 30
        while client.get("/health").json()["queued"] and time.monotonic() < deadline:   # the worker drains the queue
            time.sleep(0.02)
        assert client.get("/health").json()["queued"] == 0
        assert batches == [1]   # only the first prediction reached the model
        assert client.get(f"/v1/predictions/{queued['id']}").json()["status"] == "canceled"
        listed = [p["id"] for p in client.get("/v1/predictions").json()["results"]]
        assert listed == [waited.json()["id"], queued["id"], first["id"]]


def test_webhooks_go_to_allowed_hosts_with_retries(blip_captioner, cat, one_thread):
    """A webhook receiver on loopback that fails its first delivery: every event still arrives, and the prediction
    finishes without waiting for it. A host not on the allow-list (exact names: localhost is not 127.0.0.1) gets 422."""
    from fastapi.testclient import TestClient

    from blip.predictor import Predictor
    from blip.serve import ServeConfig
    from blip.serve_replicate import ApiConfig, create_app

    received, attempts, lock = [], [], threading.Lock()

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                attempts.append(payload["status"])
                ok = len(attempts) > 1
            if ok:
                received.append(payload)
            self.send_response(200 if ok else 500)
            self.end_headers()

        def log_message(self, *args):
            pass

    hooks = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{hooks.server_address[1]}/hook"
    api = ApiConfig(webhook_hosts=frozenset({"127.0.0.1"}), webhook_backoff_s=0.05)
    try:
        with TestClient(create_app(Predictor(blip_captioner, "cap"), ServeConfig(), api)) as client:
            body = {"version": "v", "input": {"image": cat["uri"], "task": "image_captioning"}, "webhook": url}
            r = client.post("/v1/predictions", json=body, headers={"Prefer": "wait"})
            assert r.status_code == 201 and r.json()["status"] == "succeeded"
            deadline = time.monotonic() + 30
            while len(received) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert sorted(p["status"] for p in received) == ["starting", "succeeded"]   # start, completed
            assert len(attempts) == 3 and next(p for p in received if p["output"])["output"] == r.json()["output"]
            r = client.post("/v1/predictions", json={**body, "webhook": url.replace("127.0.0.1", "localhost")})
            assert r.status_code == 422 and "localhost is not allowed" in r.json()["detail"]
            r = client.post("/v1/predictions", json={**body, "webhook_events_filter": ["finished"]})
            assert r.status_code == 422
    finally:
        hooks.shutdown()


def test_uploads_are_held_in_memory_and_the_stores_are_bounded(blip_captioner, cat, one_thread):
    from fastapi.testclient import TestClient

    from blip.predictor import Predictor
    from blip.serve import ServeConfig
    from blip.serve_replicate import ApiConfig, create_app

    data = cat["path"].read_bytes()
    api = ApiConfig(max_predictions=2, max_upload_bytes=2 * len(data))
    with TestClient(create_app(Predictor(blip_captioner, "cap"), ServeConfig(), api)) as client:
        files = [client.post("/v1/files", files={"content": ("cat.jpg", data, "image/jpeg")}).json()
                 for _ in range(3)]
        assert files[0]["size"] == len(data) and files[0]["urls"]["get"].endswith(f"/v1/files/{files[0]['id']}")
        assert client.get(f"/v1/files/{files[0]['id']}").status_code == 404   # evicted: 3 files over 2 files' bytes
        ids = []
        for file in files[1:]:
            r = client.post("/v1/predictions", json={"version": "v", "input": {"image": file["urls"]["get"]}},
                            headers={"Prefer": "wait"})
            assert r.json()["output"] == "Caption: " + blip_captioner.caption(cat["path"])[0]
            ids.append(r.json()["id"])
        r = client.post("/v1/predictions", json={"version": "v", "input": {"image": files[0]["urls"]["get"]}})
        assert r.status_code == 422 and "upload it again" in r.json()["detail"]
        r = client.post("/v1/predictions", json={"version": "v", "input": {"image": cat["uri"]}},
                        headers={"Prefer": "wait"})
        assert r.json()["input"]["image"].endswith(f"({len(cat['uri'])} characters)")   # not kept in full
        assert [p["id"] for p in client.get("/v1/predictions").json()["results"]] == [r.json()["id"], ids[1]]
        assert client.delete(f"/v1/files/{files[1]['id']}").status_code == 204


def test_without_a_token_the_server_listens_on_loopback_only():
    from blip.cli import bind_host

    host, note = bind_host(None, None)
    assert host == "127.0.0.1" and "loopback" in note
    host, note = bind_host("0.0.0.0", None)
    assert host == "0.0.0.0" and "anyone" in note
    assert bind_host(None, "secret") == ("0.0.0.0", "requests need the API token; listening on 0.0.0.0")
    assert bind_host("127.0.0.1", "secret")[0] == "127.0.0.1"
