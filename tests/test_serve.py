"""`blip serve`: a real uvicorn process on loopback (tiny BLIP-2 from the LAVIS fixture), and the BLIP endpoints in
process. Every answer is compared with the same call made directly through the model's own string API."""
import base64
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

import blip
from blip.predictor import question_prompt
from serve_process import serve_process

MAX_NEW = 8          # the tiny OPT has 64 positions: 8 queries + prompt + answer
HOT = 2.5            # sampling temperature at which the tiny model's outputs differ from seed to seed


@pytest.fixture(scope="module")
def blip2(fixtures):
    opt = fixtures / "lavis" / "blip2_opt"
    return {"model": opt / "checkpoint.pth", "llm": opt / "opt_llm"}


@pytest.fixture(scope="module")
def server(blip2):
    """`blip serve` in its own process group; always terminated."""
    with serve_process(["--model", str(blip2["model"]), "--llm", str(blip2["llm"]), "--max-new-tokens", str(MAX_NEW),
                        "--batch-size", "32", "--max-wait-ms", "50", "--max-image-mb", "1",
                        "--timeout-s", "120"]) as url:
        yield url


@pytest.fixture(scope="module")
def direct(blip2):
    return blip.load(blip2["model"], llm=blip2["llm"])


def expected(model, image: Path, question: str, seed: int | None) -> str:
    """The hosted predictor's call, made directly: the prompt "Question: q Answer:" as it is, LAVIS generate()
    defaults (5 beams; nucleus sampling with top_p 0.9)."""
    prompt = question_prompt(question)
    if seed is None:
        return model.complete(image, [prompt], num_beams=5, max_new_tokens=MAX_NEW, min_new_tokens=1)[0]
    return model.complete(image, [prompt], num_beams=1, do_sample=True, top_p=0.9, temperature=HOT,
                          max_new_tokens=MAX_NEW, min_new_tokens=1, generator=[torch.Generator().manual_seed(seed)])[0]


def test_concurrent_requests_each_get_their_own_answer(server, direct, fixtures, one_thread):
    images = sorted(p for p in (fixtures / "images").rglob("*")
                    if p.is_file() and p.name not in ("empty.jpg", "not_an_image.jpg", "truncated.jpg"))
    questions = ["what is it?", "where is this?", "how many are there?", "what color is it?", "is it day?"]
    cases = [(images[i % len(images)], questions[i % len(questions)], None if i % 4 == 0 else 1000 + i)
             for i in range(32)]

    def ask(case):
        image, question, seed = case
        data = {"question": question}
        if seed is not None:
            data.update(use_nucleus_sampling="true", temperature=str(HOT), seed=str(seed))
        r = httpx.post(f"{server}/predictions", files={"image": image.read_bytes()}, data=data, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["output"]

    health_during_batch = []

    def watch():
        deadline = time.monotonic() + 60
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < deadline and not health_during_batch:
                h = client.get(f"{server}/health").json()
                if h["running"] > 0:   # answered while requests were on the device
                    health_during_batch.append(h)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(32) as pool:
        outputs = list(pool.map(ask, cases))
    watcher.join(timeout=70)
    assert health_during_batch, "/health never answered while a batch was running"
    h = health_during_batch[0]
    assert h["device"] == "cpu" and h["dtype"] == "float32" and h["model"].endswith("checkpoint.pth")

    wanted = [expected(direct, *case) for case in cases]
    assert outputs == wanted
    assert len(set(wanted)) >= 20  # distinct enough that answers handed to the wrong request would show


def test_bad_requests_get_4xx_with_a_reason_and_the_server_goes_on(server, fixtures):
    images = fixtures / "images"
    cat = (images / "cat.jpg").read_bytes()
    post = lambda **kw: httpx.post(f"{server}/predictions", timeout=60, **kw)  # noqa: E731
    bad = [
        (413, dict(files={"image": os.urandom(2 * 2**20)})),                               # over --max-image-mb
        (413, dict(content=b"{" + b" " * (3 * 2**20) + b"}", headers={"content-type": "application/json"})),
        (413, dict(content=iter([b"{", b" " * (3 * 2**20), b"}"]), headers={"content-type": "application/json"})),
        (400, dict(files={"image": (images / "unusual" / "truncated.jpg").read_bytes()})),
        (400, dict(files={"image": (images / "unusual" / "not_an_image.jpg").read_bytes()})),
        (400, dict(content=b'{"image": "abc', headers={"content-type": "application/json"})),
        (400, dict(json={"image": "%%% not base64"})),
        (400, dict(json={"image": "https://example.com/cat.jpg"})),
        (400, dict(json=["not", "an", "object"])),
        (400, dict(content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"})),  # no boundary
        (415, dict(content=cat, headers={"content-type": "image/jpeg"})),
        (422, dict(json={"question": "no image"})),
        (422, dict(files={"image": cat}, data={"temperature": "-1"})),
        (422, dict(files={"image": cat}, data={"use_nucleus_sampling": "maybe"})),
    ]
    for status, kwargs in bad:
        r = post(**kwargs)
        assert r.status_code == status, (status, r.text)
        assert r.json()["detail"]
        ok = post(json={"image": base64.b64encode(cat).decode(), "caption": True})
        assert ok.status_code == 200 and isinstance(ok.json()["output"], str)
    assert httpx.get(f"{server}/docs", timeout=30).status_code == 200


def test_seeded_sampling_is_reproducible_and_data_uris_work(server, direct, fixtures):
    cat = fixtures / "images" / "cat.jpg"
    uri = "data:image/jpeg;base64," + base64.b64encode(cat.read_bytes()).decode()
    body = {"image": uri, "question": "what is it?", "use_nucleus_sampling": True, "temperature": HOT, "seed": 7}
    first, again = (httpx.post(f"{server}/predictions", json=body, timeout=60).json()["output"] for _ in range(2))
    assert first == again == expected(direct, cat, "what is it?", 7)
    other = httpx.post(f"{server}/predictions", json={**body, "seed": 8}, timeout=60).json()["output"]
    assert other == expected(direct, cat, "what is it?", 8) != first
    context = "Question: what is it? Answer: a cat."
    r = httpx.post(f"{server}/predictions", data={"question": "what color?", "context": context},
                   files={"image": cat.read_bytes()}, timeout=60)
    prompt = question_prompt("what color?", context)
    assert prompt == "Question: what is it? Answer: a cat. Question: what color? Answer:"
    assert r.json()["output"] == direct.complete(cat, [prompt], num_beams=5, max_new_tokens=MAX_NEW,
                                                 min_new_tokens=1)[0]


def test_blip_endpoints_in_process(tmp_path, fixtures, one_thread):
    from fastapi.testclient import TestClient

    from blip.predictor import Predictor
    from blip.serve import ServeConfig, create_app
    from tiny_weights import randomize

    cat = fixtures / "images" / "cat.jpg"
    models = {}
    for task in ("caption", "vqa", "retrieval"):
        models[task] = blip.create_model("blip_tiny", task)
        randomize(models[task], seed=2)
        models[task].eval()
    with TestClient(create_app(Predictor(models["caption"], "cap"), ServeConfig())) as client:
        r = client.post("/caption", files={"image": cat.read_bytes()}, data={"num_beams": "2", "max_new_tokens": "5"})
        assert r.json()["caption"] == models["caption"].caption(cat, num_beams=2, max_new_tokens=5, min_new_tokens=1)[0]
        r = client.post("/predictions", files={"image": cat.read_bytes()}, data={"caption": "true"})
        assert r.json()["output"] == models["caption"].caption(cat)[0]
        r = client.post("/answer", files={"image": cat.read_bytes()}, data={"question": "what?"})
        assert r.status_code == 422 and "cannot answer" in r.json()["detail"]
    with TestClient(create_app(Predictor(models["caption"], "cap"), ServeConfig(max_pixels=451 * 300 - 1))) as client:
        r = client.post("/caption", files={"image": cat.read_bytes()})     # 451 x 300: one pixel over
        assert r.status_code == 413 and "pixels" in r.json()["detail"]
    with TestClient(create_app(Predictor(models["vqa"], "vqa"), ServeConfig())) as client:
        r = client.post("/answer", json={"image": base64.b64encode(cat.read_bytes()).decode(), "question": "what?"})
        assert r.json()["answer"] == models["vqa"].answer(cat, "what?")[0]
        r = client.post("/answer", files={"image": cat.read_bytes()}, data={"question": "what?", "context": "Q: a"})
        assert r.status_code == 422 and "BLIP-2" in r.json()["detail"]
    with TestClient(create_app(Predictor(models["retrieval"], "ret"), ServeConfig())) as client:
        r = client.post("/match", files={"image": cat.read_bytes()}, data={"texts": ["a cat", "a rocket"]})
        ref = models["retrieval"].match(cat, ["a cat", "a rocket"])
        scores = r.json()["scores"]
        assert [s["text"] for s in scores] == ["a cat", "a rocket"]
        assert [s["itm"] for s in scores] == pytest.approx(ref.itm_prob[0].tolist(), abs=1e-6)
        assert [s["itc"] for s in scores] == pytest.approx(ref.itc_sim[0].tolist(), abs=1e-6)
        assert json.loads(client.get("/health").text)["tasks"] == ["match"]


def test_batcher_groups_bounds_its_queue_and_times_out():
    """The queue with a stand-in predictor: equal settings share a batch, a full queue answers 503, a slow batch 504."""
    import asyncio

    from fastapi import HTTPException

    from blip.predictor import Decoding
    from blip.serve import Batcher, Job, ServeConfig

    class Recorder:
        def __init__(self, delay=0.0):
            self.batches, self.delay = [], delay

        def caption(self, pixels, decoding, seeds):
            time.sleep(self.delay)
            self.batches.append((pixels.shape[0], decoding.num_beams))
            return [f"{decoding.num_beams}:{float(p[0, 0, 0]):.0f}" for p in pixels]

    def job(value, beams):
        return Job("caption", torch.full((3, 2, 2), float(value)), Decoding(num_beams=beams))

    async def grouped():
        recorder = Recorder()
        batcher = Batcher(recorder, ServeConfig(max_batch_size=8, max_wait_ms=50))
        batcher.start()
        out = await asyncio.gather(*(batcher.submit(job(i, 1 + i % 2)) for i in range(6)))
        batcher.task.cancel()
        return out, recorder.batches

    out, batches = asyncio.run(grouped())
    assert out == [f"{1 + i % 2}:{i}" for i in range(6)]          # each request its own result
    assert sorted(batches) == [(3, 1), (3, 2)]                      # one forward pass per setting

    async def overloaded():
        batcher = Batcher(Recorder(delay=0.5), ServeConfig(max_batch_size=1, max_wait_ms=0, max_queue=1,
                                                           timeout_s=0.2))
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(job(1, 1)))
        await asyncio.sleep(0.05)                                   # the worker has taken it: the queue is empty
        second = asyncio.ensure_future(batcher.submit(job(2, 1)))
        await asyncio.sleep(0.01)
        with pytest.raises(HTTPException) as full:
            await batcher.submit(job(3, 1))
        results = await asyncio.gather(first, second, return_exceptions=True)
        batcher.task.cancel()
        return full.value.status_code, [r.status_code for r in results]

    assert asyncio.run(overloaded()) == (503, [504, 504])
