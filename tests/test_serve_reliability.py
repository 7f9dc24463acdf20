"""`blip serve` and the one-off calls under bad or heavy input: only the offending request gets the error.

Over-long prompts are refused before they are queued (the limit named), a failure inside a batch is retried request by
request, image decoding is bounded (concurrency, pixels) and hands its memory back, SIGTERM ends a server whose client
holds a half-sent body, serve options are checked, 503s say when to retry, unknown fields are refused, and sampling
settings imply sampling everywhere (:func:`blip.generation.choose_search`)."""
import asyncio
import base64
import io
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import blip
from blip.predictor import Decoding, Predictor, UsageError, question_prompt
from blip.serve import Batcher, Job, ServeConfig, create_app
from serve_process import serve_process
from test_serve import MAX_NEW, blip2, direct  # noqa: F401 - fixtures used here
from tiny_weights import randomize

LONG_QUESTION = " ".join(["what is the colour of the thing"] * 8)   # 64 words: far over the tiny OPT's 64 positions


@pytest.fixture(scope="module")
def captioner():
    model = blip.create_model("blip_tiny", "caption")
    randomize(model, seed=4)
    return model.eval()


@pytest.fixture(scope="module")
def captioner_file(captioner, tmp_path_factory):
    from blip.convert.blip import save_safetensors
    return save_safetensors(captioner, tmp_path_factory.mktemp("serve") / "caption.safetensors")


@pytest.fixture(scope="module")
def cat(fixtures):
    path = fixtures / "images" / "cat.jpg"
    return {"path": path, "bytes": path.read_bytes(),
            "uri": "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()}


def png(width: int, height: int) -> bytes:
    """A solid-colour PNG: a few kilobytes on the wire, width x height x 3 bytes once decoded."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 40)).save(buf, "PNG")
    return buf.getvalue()


# ---- over-long prompts ----------------------------------------------------------------------------------------------
def test_prompts_too_long_for_the_positions_are_refused_by_the_string_apis(direct, captioner, cat):  # noqa: F811
    """The tiny OPT has 64 positions (its config's max_position_embeddings): 8 image queries + prompt tokens + new
    tokens must fit, counted as HF counts a sequence's length. One token over is refused with the limit named;
    without the check, two over is an IndexError inside the position embedding."""
    limit, queries = direct.llm.config.max_position_embeddings, direct.qformer.num_queries
    assert (limit, queries) == (64, 8)
    prompts = [" ".join(["cat"] * n) for n in range(30, 60)]
    fits = next(p for p in prompts if queries + len(direct.tokenizer(p)["input_ids"]) + MAX_NEW == limit)
    assert isinstance(direct.complete(cat["path"], [fits], max_new_tokens=MAX_NEW)[0], str)
    with pytest.raises(ValueError, match=r"8 image queries \+ 49 prompt tokens \+ 8 new tokens = 65 positions, but "
                                         r"the LLM has 64 \(max_position_embeddings\)"):
        direct.complete(cat["path"], [fits + " cat"], max_new_tokens=MAX_NEW)
    with pytest.raises(ValueError, match="the LLM has 64"):
        direct.answer(cat["path"], LONG_QUESTION)
    with pytest.raises(ValueError, match="the LLM has 64"):
        direct.chat(cat["path"], [LONG_QUESTION])

    positions = captioner.cfg.text.max_position_embeddings   # BLIP: [DEC] a picture of = 4 tokens + new tokens
    with pytest.raises(ValueError, match=rf"prompt \+ max_new_tokens: {positions + 1} tokens, but the model has "
                                         rf"{positions} positions"):
        captioner.check_generation_length(["a picture of "], positions - 3)
    captioner.check_generation_length(["a picture of "], positions - 4)


def test_an_over_long_request_is_refused_and_its_neighbours_answered(direct, cat, one_thread):  # noqa: F811
    """Good and over-long requests arrive together: the over-long ones get 422 naming the limit before they are
    queued, the good ones the answers the model gives them alone (the hosted prompt, 5 beams)."""
    cfg = ServeConfig(max_batch_size=16, max_wait_ms=300, decoding=Decoding(max_new_tokens=MAX_NEW))
    questions = ["what is it?", "where is this?", "what colour is it?", "is it day?"]
    calls = [("/answer", {"question": q}) for q in questions]
    calls += [("/answer", {"question": LONG_QUESTION}),
              ("/predictions", {"question": "what?", "context": LONG_QUESTION}),
              ("/predictions", {"question": questions[0]})]
    with TestClient(create_app(Predictor(direct, "opt"), cfg)) as client:
        def send(call):
            path, data = call
            return client.post(path, files={"image": cat["bytes"]}, data=data)

        with ThreadPoolExecutor(len(calls)) as pool:
            answers = list(pool.map(send, calls))
        assert client.get("/health").json()["batches"] <= 2   # the good ones shared forward passes
    for r in answers[4:6]:
        assert r.status_code == 422 and "the LLM has 64 (max_position_embeddings)" in r.json()["detail"], r.text
    got = [r.json()["answer"] for r in answers[:4]] + [answers[6].json()["output"]]
    wanted = [direct.complete(cat["path"], [question_prompt(q)], num_beams=5, max_new_tokens=MAX_NEW,
                              min_new_tokens=1)[0] for q in questions + questions[:1]]
    assert got == wanted


def test_blip_refuses_too_many_new_tokens_before_queueing(captioner, cat, one_thread):
    """BLIP's decoder has 512 positions: "[DEC] a picture of" (4) + 512 new tokens would fail inside the batch."""
    with TestClient(create_app(Predictor(captioner, "cap"), ServeConfig())) as client:
        r = client.post("/caption", files={"image": cat["bytes"]}, data={"max_new_tokens": "512"})
        assert r.status_code == 422 and "516 tokens, but the model has 512 positions" in r.json()["detail"], r.text
        r = client.post("/caption", files={"image": cat["bytes"]}, data={"max_new_tokens": "5", "num_beams": "1"})
        assert r.json()["caption"] == captioner.caption(cat["path"], max_new_tokens=5, num_beams=1)[0]
        assert client.get("/health").json()["batches"] == 1   # the refused request never reached the model


def test_a_failure_inside_a_batch_fails_only_its_request():
    """A stand-in model that fails any batch holding the poisoned image: the batch is retried request by request,
    so the poisoned request gets the error and the other five their results."""
    calls = []

    class Fragile:
        def caption(self, pixels, decoding, seeds):
            calls.append(pixels.shape[0])
            values = [float(p[0, 0, 0]) for p in pixels]
            if 13.0 in values:
                raise RuntimeError("poisoned image")
            return [f"caption {v:.0f}" for v in values]

    async def run():
        batcher = Batcher(Fragile(), ServeConfig(max_batch_size=8, max_wait_ms=100))
        batcher.start()
        jobs = [Job("caption", torch.full((3, 2, 2), float(v)), Decoding(num_beams=1)) for v in (1, 2, 13, 4, 5, 6)]
        out = await asyncio.gather(*(batcher.submit(job) for job in jobs), return_exceptions=True)
        batcher.task.cancel()
        return out

    out = asyncio.run(run())
    assert [o if isinstance(o, str) else repr(o) for o in out] == [
        "caption 1", "caption 2", "RuntimeError('poisoned image')", "caption 4", "caption 5", "caption 6"]
    assert calls == [6, 1, 1, 1, 1, 1, 1]   # the batch, then each request alone


# ---- memory ---------------------------------------------------------------------------------------------------------
def test_image_decodes_are_bounded_to_max_decodes(captioner, one_thread):
    """Eight large images at once: never more than ``max_decodes`` decoded together (each holds its whole image)."""
    image = png(2000, 1500)
    with TestClient(create_app(Predictor(captioner, "cap"), ServeConfig(max_decodes=2))) as client:
        service, active, most, lock = client.app.state.service, [0], [0], threading.Lock()
        decode = service._decode

        def counted(raw):
            with lock:
                active[0] += 1
                most[0] = max(most[0], active[0])
            try:
                time.sleep(0.1)   # long enough for the others to arrive while this one decodes
                return decode(raw)
            finally:
                with lock:
                    active[0] -= 1

        service._decode = counted
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: client.post("/caption", files={"image": image},
                                                        data={"num_beams": "1", "max_new_tokens": "2"}).status_code,
                                  range(8)))
    assert codes == [200] * 8 and most[0] == 2


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's RSS from /proc")
def test_a_burst_of_large_images_keeps_memory_bounded_and_hands_it_back(captioner_file, cat):
    """Sixteen 12-megapixel PNGs (36 MB each decoded, 40 KB each on the wire) at once: the server's memory grows by
    at most what ``--max-decodes 2`` decodes hold (a decode holds about 2.5 images: the decoded file and its RGB
    copy), comes back once the burst is over, and an image over ``--max-pixels`` is refused from its header."""
    width, height = 4000, 3000
    image, image_mb = png(width, height), width * height * 3 / 2**20
    args = ["--model", str(captioner_file), "--max-decodes", "2", "--max-pixels", str(width * height),
            "--beams", "1", "--max-new-tokens", "2"]
    with serve_process(args) as url:
        pid = url.pid
        post = lambda data: httpx.post(f"{url}/caption", files={"image": data}, timeout=120)  # noqa: E731
        assert post(image).status_code == 200     # warm: the first large decode's one-off allocations
        base, peak, done = _rss_mb(pid), [0.0], threading.Event()

        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], _rss_mb(pid))
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        with ThreadPoolExecutor(16) as pool:
            codes = [r.status_code for r in pool.map(lambda _: post(image), range(16))]
        time.sleep(0.3)
        done.set()
        watcher.join()
        after = _rss_mb(pid)
        assert codes == [200] * 16
        assert peak[0] - base < 2 * 3 * image_mb, (base, peak[0])     # unbounded: one decode per thread at once
        assert after - base < image_mb, (base, after)                 # handed back, not kept at the peak
        over = post(png(width + 1, height))
        assert over.status_code == 413 and "--max-pixels" in over.json()["detail"], over.text


# ---- shutdown -------------------------------------------------------------------------------------------------------
def test_sigterm_ends_the_server_within_its_deadline_while_a_client_holds_a_half_sent_body(captioner_file):
    with serve_process(["--model", str(captioner_file), "--shutdown-timeout-s", "2"]) as url:
        port, pid = int(url.rsplit(":", 1)[1]), url.pid
        with socket.create_connection(("127.0.0.1", port)) as stalled:
            stalled.sendall(b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 100000\r\n\r\n{\"image\": \"")   # and nothing more
            time.sleep(0.5)
            start = time.monotonic()
            os.kill(pid, signal.SIGTERM)
            while time.monotonic() - start < 30:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                if open(f"/proc/{pid}/stat").read().split()[2] == "Z":   # exited, not yet reaped
                    break
                time.sleep(0.05)
            took = time.monotonic() - start
    assert took < 2 + 5, f"the server took {took:.1f} s to exit after SIGTERM (deadline 2 s)"


# ---- options, 503, unknown fields ----------------------------------------------------------------------------------
@pytest.mark.parametrize("option", [dict(max_queue=0), dict(max_batch_size=0), dict(timeout_s=0),
                                    dict(max_pixels=-1), dict(max_decodes=0), dict(max_wait_ms=-1),
                                    dict(shutdown_timeout_s=0)])
def test_serve_config_refuses_non_positive_limits(option):
    with pytest.raises(UsageError, match=f"{next(iter(option))} must be"):
        ServeConfig(**option)


def test_a_full_queue_answers_503_with_retry_after(captioner, cat, one_thread):
    """One request held on the device, one queued (max_queue 1): the next gets 503 with Retry-After, from the
    native routes and from the Replicate API alike."""
    from blip.serve_replicate import create_app as create_replicate_app

    predictor, gate = Predictor(captioner, "cap"), threading.Event()
    caption = predictor.caption

    def held(pixels, decoding, seeds):
        assert gate.wait(60)
        return caption(pixels, decoding, seeds)

    predictor.caption = held
    with TestClient(create_replicate_app(predictor, ServeConfig(max_queue=1, max_wait_ms=0))) as client:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.post, "/caption", files={"image": cat["bytes"]})
            while client.get("/health").json()["running"] == 0:
                time.sleep(0.02)
            second = pool.submit(client.post, "/caption", files={"image": cat["bytes"]})
            while client.get("/health").json()["queued"] == 0:
                time.sleep(0.02)
            native = client.post("/caption", files={"image": cat["bytes"]})
            api = client.post("/v1/predictions", json={"version": "v", "input": {"image": cat["uri"]}})
            gate.set()
            assert first.result().status_code == second.result().status_code == 200
    assert native.status_code == 503 and native.headers["Retry-After"] == "1"
    assert api.status_code == 503 and api.headers["Retry-After"] == "1" and api.json()["title"]


def test_unknown_fields_are_refused_with_their_name(captioner, cat, one_thread):
    from blip.serve_replicate import create_app as create_replicate_app

    with TestClient(create_replicate_app(Predictor(captioner, "cap"), ServeConfig())) as client:
        refused = [
            client.post("/caption", files={"image": cat["bytes"]}, data={"temprature": "0.7"}),
            client.post("/caption", json={"image": cat["uri"], "num_beam": 2}),
            client.post("/predictions", json={"image": cat["uri"], "taks": "image_captioning"}),
            client.post("/predictions", json={"input": {"image": cat["uri"], "questoin": "what?"}}),
            client.post("/predictions", json={"input": {"image": cat["uri"]}, "inputs": {}}),
            client.post("/v1/predictions", json={"version": "v", "input": {"image": cat["uri"], "prompt": "a"}}),
            client.post("/v1/predictions", json={"version": "v", "input": {"image": cat["uri"]}, "hook": "x"}),
            client.post("/v1/models/salesforce/blip/predictions",
                        json={"version": "v", "input": {"image": cat["uri"]}}),   # the version is in the path
        ]
        names = ["temprature", "num_beam", "taks", "questoin", "inputs", "prompt", "hook", "version"]
        for r, name in zip(refused, names):
            assert r.status_code == 422 and name in str(r.json()["detail"]), (name, r.text)
        # the API's own fields are taken: the clients send them
        r = client.post("/v1/predictions", json={"version": "v", "input": {"image": cat["uri"]}, "stream": False,
                                                 "webhook_events_filter": ["completed"]}, headers={"Prefer": "wait"})
        assert r.status_code == 201 and r.json()["status"] == "succeeded", r.text
        r = client.post("/v1/predictions", json={"version": "v", "input": {"image": cat["uri"]}, "stream": True})
        assert r.status_code == 422 and "stream" in r.json()["detail"]
        r = client.post("/predictions", json={"id": "a", "created_at": "2024-01-01T00:00:00Z",
                                              "input": {"image": cat["uri"]}})
        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text


# ---- sampling settings imply sampling -------------------------------------------------------------------------------
@pytest.mark.parametrize("given, chosen", [
    (dict(), (False, None)), (dict(num_beams=4), (False, 4)), (dict(do_sample=True), (True, 1)),
    (dict(temperature=0.7), (True, 1)), (dict(top_p=0.9), (True, 1)), (dict(top_k=50), (True, 1)),
    (dict(temperature=1.0, top_p=1.0, top_k=0), (False, None)),   # neutral values change nothing
    (dict(do_sample=True, num_beams=1, temperature=2.0), (True, 1)),
])
def test_choose_search(given, chosen):
    from blip.generation import choose_search
    assert choose_search(**given) == chosen


@pytest.mark.parametrize("given, message", [
    (dict(do_sample=False, temperature=0.7), "temperature=0.7 only act when sampling"),
    (dict(do_sample=False, top_p=0.5, top_k=3), "top_p=0.5, top_k=3 only act when sampling"),
    (dict(do_sample=True, num_beams=3), "sampling with 3 beams"),
    (dict(top_p=0.5, num_beams=2), "sampling with 2 beams"),
])
def test_choose_search_refuses_contradictions(given, message):
    from blip.generation import choose_search
    with pytest.raises(ValueError, match=message):
        choose_search(**given)


def test_sampling_settings_imply_sampling_in_the_string_apis(direct, captioner, cat):  # noqa: F811
    """Expected outputs come from the tensor-level generate (HF's sampling arguments, one beam), not from the string
    API under test."""
    path = cat["path"]
    pixels = direct.pixel_values(path)
    prompt = direct.config.prompt

    def sampled(seed, **gen):
        ids = direct.tokenizer([prompt], return_tensors="pt")
        out = direct.generate(pixels, ids.input_ids, ids.attention_mask, num_beams=1, do_sample=True,
                              generator=[torch.Generator().manual_seed(seed)], **gen)
        return direct.tokenizer.batch_decode(out[:, ids.input_ids.shape[1]:], skip_special_tokens=True)[0].strip()

    defaults = {k: v for k, v in direct.caption_defaults().items() if k != "num_beams"}
    # do_sample alone: one beam (the default 5 beams used to make it fail)
    assert direct.caption(path, do_sample=True, generator=[torch.Generator().manual_seed(3)]) == \
        [sampled(3, **defaults)]
    # a temperature alone samples (it used to be ignored by beam search)
    assert direct.caption(path, temperature=2.5, generator=[torch.Generator().manual_seed(4)]) == \
        [sampled(4, temperature=2.5, **defaults)]
    with pytest.raises(ValueError, match=r"temperature=2.5 only act when sampling, but sampling is off"):
        direct.caption(path, temperature=2.5, do_sample=False)
    with pytest.raises(ValueError, match="sampling with 3 beams is not supported"):
        direct.answer(path, "what?", do_sample=True, num_beams=3)

    from blip.data.tokenizer import caption_prompt_ids
    g, ref_g = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    cap_pixels = captioner._pixels(path)
    ids = caption_prompt_ids(captioner.tokenizer, "a picture of ", 1)
    out = captioner.generate(cap_pixels, ids, max_new_tokens=16, min_new_tokens=1, num_beams=1, do_sample=True,
                             top_p=0.9, top_k=50, temperature=1.5, repetition_penalty=1.1,
                             beam_length_convention="total", generator=ref_g)
    wanted = captioner.tokenizer.batch_decode(out, skip_special_tokens=True)[0][len("a picture of "):]
    assert captioner.caption(path, temperature=1.5, generator=g) == [wanted]


def test_the_server_and_cli_follow_the_same_sampling_rule(captioner, captioner_file, cat, capsys, one_thread):
    from blip.cli import main
    from blip.predictor import row_generators

    def sampled(seed, temperature):
        return captioner.caption(cat["path"], temperature=temperature, max_new_tokens=6,
                                 generator=row_generators([seed], 1))[0]

    with TestClient(create_app(Predictor(captioner, "cap"), ServeConfig(decoding=Decoding(num_beams=3)))) as client:
        r = client.post("/caption", files={"image": cat["bytes"]},
                        data={"temperature": "1.5", "seed": "7", "max_new_tokens": "6"})
        assert r.status_code == 200 and r.json()["caption"] == sampled(7, 1.5)   # the server's 3 beams make way
        r = client.post("/caption", files={"image": cat["bytes"]},
                        data={"temperature": "1.5", "do_sample": "false"})
        assert r.status_code == 422 and "temperature=1.5 only act when sampling" in r.json()["detail"]
    assert main(["caption", str(cat["path"]), "--model", str(captioner_file), "--temperature", "1.5", "--seed", "7",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip().split("\t")[1] == sampled(7, 1.5)
