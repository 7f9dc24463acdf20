"""CapFilt end-to-end on tiny random models and real photos: output readable by the project's loader, corrupt
images skipped and counted, kill + resume == uninterrupted (byte for byte), rank sharding == one process."""
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from webdataset import TarWriter

from blip.capfilt import CapFilt, CapFiltConfig, CapFiltInput, output_urls
from blip.data.datasets import JsonSource, decode
from blip.data.skips import SkipCounter
from blip.data.transforms import image_transform
from blip.data.webdataset import WebDatasetSource
from blip.models.blip import create
from conftest import FIXTURES

REPO = Path(__file__).resolve().parents[1]
ASSETS = FIXTURES / "images"
GOOD = ["astronaut.jpg", "cat.jpg", "coffee.jpg", "rocket.jpg", "hubble_deep_field.jpg"]
# (file, key extension in the shard); gif bytes under .jpg: decodable, re-encoded as JPEG on output
SHARDS = [[("astronaut.jpg", "jpg"), ("cat.jpg", "jpg"), ("unusual/not_an_image.jpg", "jpg"),
           ("unusual/grayscale.png", "png"), ("coffee.jpg", "jpg")],
          [("rocket.jpg", "jpg"), ("unusual/truncated.jpg", "jpg"), ("unusual/palette.gif", "jpg"),
           ("hubble_deep_field.jpg", "jpg")]]
CAPTIONS = {"astronaut.jpg": "A woman in an orange space suit!", "cat.jpg": "a tabby cat", "coffee.jpg": "coffee cup",
            "rocket.jpg": "rocket launch at night", "hubble_deep_field.jpg": "galaxies in deep space",
            "unusual/not_an_image.jpg": "broken", "unusual/grayscale.png": "a gray picture",
            "unusual/truncated.jpg": "half a photo", "unusual/palette.gif": "a palette image"}


def write_input_shards(d: Path) -> str:
    d.mkdir(parents=True, exist_ok=True)
    for s, files in enumerate(SHARDS):
        with TarWriter(str(d / f"in-{s:03d}.tar"), encoder=False, mtime=0.0) as tar:
            for i, (name, ext) in enumerate(files):
                meta = json.dumps({"image_id": 100 * s + i}).encode()
                tar.write({"__key__": f"{s:03d}{i:05d}", ext: (ASSETS / name).read_bytes(),
                           "txt": CAPTIONS[name].encode(), "json": meta})
    return str(d / "in-{000..001}.tar")


def models():
    torch.manual_seed(0)
    cap = create("blip_tiny", "caption", image_size=32)
    filt = create("blip_tiny", "retrieval", image_size=32)
    with torch.no_grad():   # larger random weights so ITM scores depend on the text: some pass, some don't
        for name, p in filt.text_encoder.named_parameters():
            if p.ndim == 2 and "embeddings" not in name:
                p.normal_(0.0, 0.3)
        filt.itm_head.weight.normal_(0.0, 1.0)
        filt.itm_head.bias.zero_()
    return cap, filt


CFG = dict(num_captions=2, batch_size=2, chunk_size=4, max_length=8, min_length=5, threshold=0.5, seed=3,
           num_workers=2, progress=False)


def run(out: Path, source: CapFiltInput, **kw):
    cap, filt = models()
    return CapFilt(cap, filt, CapFiltConfig(**CFG)).run(source, out, **kw)


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("capfilt")
    urls = write_input_shards(root / "input")
    out = root / "uninterrupted"
    summary = run(out, CapFiltInput(urls=urls))
    return root, urls, out, summary


def test_summary_index_and_provenance(reference):
    _, _, out, summary = reference
    assert summary["images_in"] == 9
    assert summary["images_skipped"] == {"bad_image": 2}          # not_an_image.jpg, truncated.jpg
    web, syn = summary["captions"]["web"], summary["captions"]["synthetic"]
    assert web["kept"] + web["dropped"] == 7 and syn["kept"] + syn["dropped"] == 14
    assert web["kept"] + syn["kept"] == summary["num_samples"] > 0
    assert web["dropped"] + syn["dropped"] > 0
    index = json.loads((out / "index.json").read_text())
    assert [r["image_id"] for r in index] == [0, 1, 3, 4, 100, 102, 103]
    for rec in index:
        assert [c["source"] for c in rec["captions"]] == ["web", "synthetic", "synthetic"]
        for c in rec["captions"]:
            assert 0.0 <= c["itm_score"] <= 1.0
            assert c["kept"] == (c["itm_score"] >= 0.5 and bool(c["text"]))
            assert ("sample_key" in c) == c["kept"]
    assert index[0]["captions"][0]["text"] == "A woman in an orange space suit!"   # web text stored as given


def test_output_readable_by_project_loader(reference):
    _, _, out, summary = reference
    src = WebDatasetSource(output_urls(out), num_samples=summary["num_samples"])
    skips = SkipCounter()
    transform = image_transform(32, train=False)
    samples = [s for u in range(src.num_units) for s in src.iter_unit(u, skips)]
    assert len(samples) == summary["num_samples"] and not skips.counts
    index = {r["image_id"]: r for r in json.loads((out / "index.json").read_text())}
    for s in samples:
        d = decode(s, transform, lambda t: t)
        assert d is not None and d["pixel_values"].shape == (3, 32, 32)
        kept = [c["text"] for c in index[s["image_id"]]["captions"] if c["kept"]]
        assert s["text"] in kept
    # passed-through bytes are the original file; the gif was re-encoded as JPEG
    with open(out / summary["shards"][0], "rb") as f:
        import tarfile
        names = tarfile.open(fileobj=io.BytesIO(f.read())).getnames()
    assert all(n.split(".", 1)[1] in ("jpg", "png", "txt", "json") for n in names)


def test_killed_and_resumed_equals_uninterrupted(reference):
    root, urls, ref, _ = reference
    out = root / "killed"
    seen = []

    def die_after_three(unit, chunk, batch):
        seen.append((unit, chunk, batch))
        if len(seen) == 3:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        run(out, CapFiltInput(urls=urls), on_batch=die_after_three)
    assert not (out / "summary.json").exists()
    committed = sorted(p.name for p in (out / "records").glob("*.json"))
    assert committed == ["00000-0000.json"]   # chunk 0 (2 batches) committed; chunk 1 died after its first batch
    (out / "shards" / "00000-0001.tar.tmp4242").write_bytes(b"half a tar")   # as a SIGKILL mid-write leaves it
    resumed = []
    run(out, CapFiltInput(urls=urls), on_batch=lambda *a: resumed.append(a))
    assert resumed[0] == (0, 1, 0)                    # restarts at the chunk in flight, skips the committed one
    assert tree(out) == tree(ref)


def test_rank_sharding_equals_one_process(reference):
    root, urls, ref, _ = reference
    out = root / "two_ranks"
    assert run(out, CapFiltInput(urls=urls), rank=1, world_size=2) is None     # rank 1: unit 1, no merge
    run(out, CapFiltInput(urls=urls), rank=0, world_size=2)
    assert tree(out) == tree(ref)


def test_captions_do_not_depend_on_batching(reference):
    """Each synthetic caption has its own random stream (seed, sample key, index): batch size is irrelevant."""
    root, urls, ref, _ = reference
    out = root / "batch3"
    cap, filt = models()
    CapFilt(cap, filt, CapFiltConfig(**{**CFG, "batch_size": 3})).run(CapFiltInput(urls=urls), out)
    captions = lambda d: {r["key"]: [c["text"] for c in r["captions"]]  # noqa: E731
                          for r in json.loads((d / "index.json").read_text())}
    assert captions(out) == captions(ref)


def test_json_input_and_index_readable_by_json_source(tmp_path):
    entries = [{"image": n, "caption": [CAPTIONS[n], "a photo"], "image_id": f"img{i}"} for i, n in enumerate(GOOD)]
    entries.append({"image": "missing.jpg", "caption": "gone"})
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(entries))
    summary = run(tmp_path / "out", CapFiltInput(annotation=ann, image_root=ASSETS, images_per_unit=4))
    assert summary["images_in"] == 6 and summary["images_skipped"] == {"bad_image": 1}
    src = JsonSource(tmp_path / "out" / "index.json", image_root=ASSETS)
    assert src.num_samples == summary["num_samples"]
    kept_by_image = {}
    for rec in json.loads((tmp_path / "out" / "index.json").read_text()):
        assert [c["source"] for c in rec["captions"]] == ["web", "web", "synthetic", "synthetic"]
        kept_by_image[rec["image"]] = [c["text"] for c in rec["captions"] if c["kept"]]
    pairs = [s for u in range(src.num_units) for s in src.iter_unit(u, SkipCounter())]
    assert sorted((s["key"], s["text"]) for s in pairs) == sorted((k, t) for k, ts in kept_by_image.items() for t in ts)


@pytest.mark.timeout(120)
def test_script_smoke(tmp_path):
    urls = write_input_shards(tmp_path / "input")
    cmd = [sys.executable, str(REPO / "scripts" / "capfilt.py"), f"input.urls='{urls}'",
           f"output_dir={tmp_path / 'out'}",
           "captioner.arch=blip_tiny", "filter.arch=blip_tiny", "capfilt.batch_size=4", "capfilt.progress=false",
           "capfilt.max_length=8", "device=cpu"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=110)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["images_in"] == 9 and summary["images_skipped"] == {"bad_image": 2}
    assert "capfilt: 9 images in" in res.stdout


def test_load_task_model_from_a_training_run(tmp_path):
    from blip.api import load_task_model
    from blip.checkpoints import CheckpointError
    from blip.objectives.blip_finetune import CaptionObjective

    cap, _ = models()
    objective = CaptionObjective(cap)
    step = tmp_path / "run" / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    torch.save({"model": objective.state_dict(), "trainer": {}}, step / "state.pt")
    (tmp_path / "run" / "config.yaml").write_text(
        "model:\n  arch: blip_tiny\n  task: caption\n  image_size: 32\n  overrides:\n    image_size: 32\n")
    loaded = load_task_model(tmp_path / "run", "blip_base", "caption")    # arch / size from the run's config
    assert loaded.cfg.image_size == 32
    for (name, a), (_, b) in zip(cap.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    # the same strict policy as blip.load(<run dir>): a checkpoint missing a tensor is refused by name
    state = objective.state_dict()
    del state["visual_encoder.cls_token"]
    torch.save({"model": state, "trainer": {}}, step / "state.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_task_model(tmp_path / "run", "blip_base", "caption")


def test_every_input_is_in_the_index_or_the_skip_list(reference):
    _, _, out, summary = reference
    index = json.loads((out / "index.json").read_text())
    skipped = json.loads((out / "skipped.json").read_text())
    assert [(s["reason"], s["key"].rsplit(":", 1)[1]) for s in skipped] == [("bad_image", "00000002"),
                                                                             ("bad_image", "00100001")]
    assert "not a recognised image format" in skipped[0]["detail"] and "truncated" in skipped[1]["detail"]
    keys = [r["key"].rsplit(":", 1)[1] for r in index + skipped]
    assert sorted(keys) == sorted(f"{s:03d}{i:05d}" for s, files in enumerate(SHARDS) for i in range(len(files)))


@pytest.mark.parametrize("change, listed", [
    ({"chunk_size": 3}, "capfilt.chunk_size: 4 -> 3"),
    ({"threshold": 0.6}, "capfilt.threshold: 0.5 -> 0.6"),
    ({"urls": "first_only"}, "input.urls"),
])
def test_resume_with_other_settings_refuses_and_lists_the_differences(reference, change, listed):
    from blip.capfilt import CapFiltSettingsError

    root, urls, ref, _ = reference
    before = tree(ref)
    source = CapFiltInput(urls=urls.replace("{000..001}", "000") if "urls" in change else urls)
    cap, filt = models()
    cfg = CapFiltConfig(**{**CFG, **{k: v for k, v in change.items() if k != "urls"}})
    with pytest.raises(CapFiltSettingsError, match=listed.replace(".", r"\.")) as err:
        CapFilt(cap, filt, cfg).run(source, ref)
    assert "settings.json" in str(err.value) and tree(ref) == before  # nothing written


def test_bad_web_captions_are_left_out_and_listed(tmp_path):
    entries = [{"image": "cat.jpg", "caption": None}, {"image": "coffee.jpg", "caption": ["coffee\x00cup", "ok"]}]
    (tmp_path / "ann.json").write_text(json.dumps(entries))
    run(tmp_path / "out", CapFiltInput(annotation=tmp_path / "ann.json", image_root=ASSETS))
    index = {r["image"]: r for r in json.loads((tmp_path / "out" / "index.json").read_text())}
    assert [c["text"] for c in index["cat.jpg"]["captions"] if c["source"] == "web"] == []
    assert "NoneType" in index["cat.jpg"]["bad_web_captions"][0]
    assert [c["text"] for c in index["coffee.jpg"]["captions"] if c["source"] == "web"] == ["ok"]
    assert "NUL" in index["coffee.jpg"]["bad_web_captions"][0]
