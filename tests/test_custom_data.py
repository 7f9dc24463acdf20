"""Users' own data (blip.data.custom): every format reads to the same rows, kinds, errors naming file and row,
skipped rows, and the training source's batches."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image
from webdataset import TarWriter

from blip.data.custom import (CAPTION_INSTRUCTION, CustomDataError, CustomRow, CustomSource, custom_text_cleaner,
                              iter_row_images, read_custom)
from blip.data.datasets import ImageTextStream
from blip.data.transforms import image_transform

COLORS = {"red.png": (255, 0, 0), "green.png": (0, 255, 0), "blue.png": (0, 0, 255)}

CAPTION_ROWS = [{"image": "red.png", "caption": "A red square."}, {"image": "green.png", "caption": "green, all green"},
                {"image": "red.png", "caption": "the colour of a fire truck"}]
VQA_ROWS = [{"image": "blue.png", "question": "What colour is it?", "answer": "blue"},
            {"image": "red.png", "question": "Is it red?", "answer": "yes"}]
INSTRUCTION_ROWS = [{"image": "green.png", "instruction": "Describe the image.", "response": "A green field."},
                    {"image": "blue.png", "instruction": "And its colour?", "response": "Blue.",
                     "context": "Describe the image.\nA blue square."}]

MIXED_ROWS = [CAPTION_ROWS[0], VQA_ROWS[0], INSTRUCTION_ROWS[1]]


def row_from(record: dict, kind: str) -> CustomRow:
    """The row a record's fields describe, written out by hand (image and where left empty)."""
    if kind == "caption":
        return CustomRow("", kind, "", captions=(record["caption"],))
    if kind == "vqa":
        return CustomRow("", kind, "", question=record["question"], answers=(record["answer"],))
    return CustomRow("", kind, "", instruction=record["instruction"], response=record["response"],
                     context=record.get("context"))


def png(color) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(out, format="PNG")
    return out.getvalue()


def write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, color in COLORS.items():
        (folder / name).write_bytes(png(color))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict], image_field: str = "image") -> Path:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, [image_field if c == "image" else c for c in columns])
        writer.writeheader()
        for r in rows:
            writer.writerow({(image_field if k == "image" else k): v for k, v in r.items()})
    return path


def write_shard(path: Path, rows: list[dict]) -> None:
    with TarWriter(str(path), encoder=False, mtime=0.0) as tar:
        for i, r in enumerate(rows):
            meta = {k: v for k, v in r.items() if k != "image"}
            tar.write({"__key__": f"{i:05d}", "png": png(COLORS[r["image"]]), "json": json.dumps(meta).encode()})


def write_every_format(root: Path, rows: list[dict]) -> dict[str, Path | str]:
    """The same rows as JSONL, a JSON list, CSV, two imagefolders, one shard, a brace pattern and a shard folder."""
    write_images(root)
    paths: dict[str, Path | str] = {"jsonl": write_jsonl(root / "rows.jsonl", rows)}
    (root / "rows.json").write_text(json.dumps(rows, indent=2))
    paths["json"] = root / "rows.json"
    paths["csv"] = write_csv(root / "rows.csv", rows)
    for name, writer in (("folder_jsonl", write_jsonl), ("folder_csv", write_csv)):
        folder = root / name
        write_images(folder)
        renamed = [{("file_name" if k == "image" else k): v for k, v in r.items()} for r in rows]
        writer(folder / f"metadata.{name.split('_')[1]}", renamed)
        paths[name] = folder
    write_shard(root / "one.tar", rows)
    (root / "shards").mkdir()
    write_shard(root / "shards/part-000.tar", rows[:1])
    write_shard(root / "shards/part-001.tar", rows[1:])
    paths["tar"], paths["brace"] = root / "one.tar", str(root / "shards/part-{000..001}.tar")
    paths["tar_dir"] = root / "shards"
    return paths


def content(data) -> list[tuple[CustomRow, bytes]]:
    """Rows without their `where` / image reference, each with its image's bytes."""
    def image_bytes(source):
        return source if isinstance(source, bytes) else Path(source).read_bytes()
    return [(replace(row, image="", where=""), image_bytes(src)) for row, src in iter_row_images(data)]


@pytest.mark.parametrize("rows,kind", [(CAPTION_ROWS, "caption"), (VQA_ROWS, "vqa"),
                                       (INSTRUCTION_ROWS, "instruction"), (MIXED_ROWS, "instruction")])
def test_every_format_reads_to_the_same_rows(tmp_path, rows, kind):
    paths = write_every_format(tmp_path, rows)
    expected = content(read_custom(paths["jsonl"]))
    if rows is MIXED_ROWS:
        hand = [CustomRow("", kind, "", instruction=CAPTION_INSTRUCTION, response=rows[0]["caption"]),
                CustomRow("", kind, "", instruction=rows[1]["question"], response=rows[1]["answer"]),
                row_from(rows[2], kind)]
    else:
        hand = [row_from(r, kind) for r in rows]
    assert expected == [(row, png(COLORS[r["image"]])) for row, r in zip(hand, rows)]
    for name, path in paths.items():
        data = read_custom(path)
        assert data.kind == kind, name
        assert content(data) == expected, name
        assert data.skipped == {}
    first = read_custom(paths["jsonl"]).rows[0]
    assert first.where == f"{paths['jsonl']}:1" and first.image == str(tmp_path / rows[0]["image"])
    assert read_custom(paths["csv"]).rows[0].where == f"{paths['csv']}:2"   # line 1 is the header
    assert read_custom(paths["json"]).rows[1].where == f"{paths['json']}:1"
    assert read_custom(paths["tar"]).rows[0].where == f"{paths['tar']}:00000"


def test_fields_become_the_rows_of_their_kind(tmp_path):
    write_images(tmp_path)
    rows = read_custom(write_jsonl(tmp_path / "a.jsonl", [
        {"image": "red.png", "caption": ["one", "two"], "image_id": 7},
        {"image": "blue.png", "caption": "three"}])).rows
    assert [r.captions for r in rows] == [("one", "two"), ("three",)]
    vqa = read_custom(write_jsonl(tmp_path / "b.jsonl", [
        {"image": "red.png", "question": "how many?", "answer": ["2", "two", "2"]}])).rows[0]
    assert (vqa.kind, vqa.question, vqa.answers) == ("vqa", "how many?", ("2", "two", "2"))
    inst = read_custom(write_jsonl(tmp_path / "c.jsonl", [
        {"image": "red.png", "instruction": "Say hi.", "response": "hi", "context": ""}])).rows[0]
    assert (inst.kind, inst.instruction, inst.response, inst.context) == ("instruction", "Say hi.", "hi", None)


def test_llava_conversations_are_instruction_rows_with_their_history(tmp_path):
    write_images(tmp_path)
    llava = [{"id": "x", "image": "green.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "A green field."}]},
        {"id": "y", "image": "blue.png", "conversations": [
            {"from": "human", "value": "Describe the image.\n<image>"}, {"from": "gpt", "value": "A blue square."},
            {"from": "human", "value": "And its colour?"}, {"from": "gpt", "value": "Blue."}]}]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    data = read_custom(tmp_path / "llava.json")
    assert data.kind == "instruction"
    plain = read_custom(write_jsonl(tmp_path / "plain.jsonl", [
        INSTRUCTION_ROWS[0], {"image": "blue.png", "instruction": "Describe the image.", "response": "A blue square."},
        INSTRUCTION_ROWS[1]]))
    assert content(data) == content(plain)
    assert [r.where for r in data.rows] == [f"{tmp_path / 'llava.json'}:{i}" for i in (0, 1, 1)]


def test_a_file_of_mixed_kinds_is_read_as_instructions(tmp_path, caplog):
    write_images(tmp_path)
    rows = [{"image": "red.png", "caption": ["a red square", "red"]},
            {"image": "blue.png", "question": "what colour?", "answer": ["blue", "navy", "navy", "blue", "navy"]},
            INSTRUCTION_ROWS[0]]
    with caplog.at_level("INFO", logger="blip.data"):
        data = read_custom(write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert data.kind == "instruction" and "mixes kinds" in caplog.text
    assert [(r.kind, r.instruction, r.response) for r in data.rows] == [
        ("instruction", CAPTION_INSTRUCTION, "a red square"), ("instruction", CAPTION_INSTRUCTION, "red"),
        ("instruction", "what colour?", "navy"), ("instruction", "Describe the image.", "A green field.")]


def test_errors_name_the_file_the_row_and_the_fix(tmp_path):
    write_images(tmp_path)
    f = tmp_path / "a.jsonl"
    cases = [
        ([{"image": "red.png", "caption": "ok"}, {"image": "nothere.png", "caption": "x"}], ":2", "not found"),
        ([{"image": "red.png", "label": "cat"}], ":1", "fits no kind: it has fields ['image', 'label']"),
        ([{"image": "red.png", "question": "why?"}], ":1", "fits no kind"),
        ([{"image": "red.png", "caption": ""}], ":1", "'caption' is ''"),
        ([{"image": "red.png", "caption": ["ok", 3]}], ":1", "'caption' is 3"),
        ([{"image": "red.png", "caption": None}], ":1", "'caption' is None"),
        ([{"image": "red.png", "caption": "a", "question": "b", "answer": "c"}], ":1", "one row carries one kind"),
        ([{"caption": "no image"}], ":1", "needs 'image'"),
        ([{"image": "../../etc/passwd", "caption": "x"}], ":1", "leaves the image root"),
        ([{"image": "/etc/passwd", "caption": "x"}], ":1", "leaves the image root"),
        ([{"image": "red.png", "conversations": [{"from": "gpt", "value": "hi"}]}], ":1", "human / gpt"),
        ([["red.png", "x"]], ":1", "not an object"),
    ]
    for rows, row, words in cases:
        write_jsonl(f, rows)
        with pytest.raises(CustomDataError) as e:
            read_custom(f)
        assert f"{f}{row}:" in str(e.value) and words in str(e.value), (rows, str(e.value))
    f.write_text(json.dumps({"image": "red.png", "caption": "ok"}) + "\n\n" + '{"image": "red.png", caption}\n')
    with pytest.raises(CustomDataError, match=r"a\.jsonl:3: invalid JSON on line 3"):
        read_custom(f)
    (tmp_path / "b.json").write_text('[\n {"image": "red.png",\n  "caption": "x"\n ,]')
    with pytest.raises(CustomDataError, match=r"b\.json: invalid JSON at line 4"):
        read_custom(tmp_path / "b.json")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(CustomDataError, match=r"empty\.jsonl: no rows"):
        read_custom(tmp_path / "empty.jsonl")
    with pytest.raises(CustomDataError, match="cannot read the file"):
        read_custom(tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text('image,caption\nred.png,"two\nlines"\n\ngone.png,x\n')   # rows on 2-3 and 5
    with pytest.raises(CustomDataError, match=r"d\.csv:5: image 'gone\.png' not found"):
        read_custom(tmp_path / "d.csv")
    with pytest.raises(CustomDataError, match="no 'image'"):
        read_custom(write_csv(tmp_path / "c.csv", [{"picture": "red.png", "caption": "x"}]))
    with pytest.raises(CustomDataError, match=r"shards not found"):
        read_custom(str(tmp_path / "s-{000..001}.tar"))
    with pytest.raises(CustomDataError, match="a directory without metadata.jsonl"):
        read_custom(tmp_path)


def test_image_root_and_paths_inside_it(tmp_path):
    write_images(tmp_path / "images")
    (tmp_path / "ann").mkdir()
    f = write_jsonl(tmp_path / "ann/a.jsonl", [{"image": "red.png", "caption": "x"},
                                              {"image": str(tmp_path / "images/blue.png"), "caption": "y"}])
    with pytest.raises(CustomDataError, match="not found"):
        read_custom(f)   # relative to the file's folder by default
    rows = read_custom(f, image_root=tmp_path / "images").rows
    assert [r.image for r in rows] == [str(tmp_path / "images/red.png"), str(tmp_path / "images/blue.png")]
    with pytest.raises(CustomDataError, match="leaves the image root"):
        read_custom(write_jsonl(tmp_path / "ann/b.jsonl", [{"image": "../images/red.png", "caption": "x"}]))


def test_strict_false_skips_and_counts_bad_rows(tmp_path, caplog):
    write_images(tmp_path)
    f = tmp_path / "a.jsonl"
    rows = [{"image": "red.png", "caption": "good"}, {"image": "gone.png", "caption": "x"}, "{not json",
            {"image": "red.png", "label": "x"}, {"image": "gone.png", "caption": "y"},
            {"image": "../x.png", "caption": "y"}, {"image": "blue.png", "caption": ""}]
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    f.write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING", logger="blip.data"):
        data = read_custom(f, strict=False)
    assert [r.captions for r in data.rows] == [("good",)]
    assert data.skipped == {"missing_image": 2, "bad_json": 1, "no_kind": 1, "image_outside_root": 1, "bad_text": 1}
    assert "skipped 6 bad rows" in caplog.text and f"{f}:2" in caplog.text
    f.write_text(lines[1] + "\n")
    with pytest.raises(CustomDataError, match=r"no rows \(1 bad rows skipped"):
        read_custom(f, strict=False)


def test_shard_samples_without_an_image_or_with_a_txt_caption(tmp_path):
    with TarWriter(str(tmp_path / "s.tar"), encoder=False, mtime=0.0) as tar:
        tar.write({"__key__": "a", "png": png((1, 2, 3)), "txt": b"a caption from txt"})
        tar.write({"__key__": "b", "json": json.dumps({"caption": "no image"}).encode()})
    with pytest.raises(CustomDataError, match=r"s\.tar:b: no image member"):
        read_custom(tmp_path / "s.tar")
    data = read_custom(tmp_path / "s.tar", strict=False)
    assert [r.captions for r in data.rows] == [("a caption from txt",)] and data.skipped == {"missing_image": 1}
    assert data.rows[0].image == f"{tmp_path / 's.tar'}#a.png"


def test_text_cleaners():
    assert custom_text_cleaner("caption", None)("A man's dog, (running).") == "a man's dog, running"
    assert custom_text_cleaner("caption", 2)("one two three") == "one two"
    assert custom_text_cleaner("vqa", None)("What's (in) the Picture?") == "what's in the picture?"
    assert custom_text_cleaner("instruction", 1)("  Keep   Case.\n\n\t and  lines ") == "Keep Case.\nand lines"
    with pytest.raises(ValueError, match="kind must be one of"):
        custom_text_cleaner("retrieval", None)


def batches_of(data, batch_size: int, batches: int = 1, text_fn=None) -> list[dict]:
    kw = {"text_fn": text_fn} if text_fn else {}
    stream = ImageTextStream([CustomSource(data, unit_size=2)], image_transform(16), batch_size=batch_size,
                             batches_per_epoch=batches, shuffle_buffer=0, **kw)
    return list(stream)


@pytest.mark.parametrize("fmt", ["jsonl", "brace"])
def test_the_training_stream_gives_each_kind_its_batch_fields(tmp_path, fmt):
    captions = [{"image": "red.png", "caption": ["A red square.", "Red!"]}, {"image": "blue.png", "caption": "Blue."}]
    questions = [{"image": "blue.png", "question": "What colour?", "answer": ["blue", "navy", "blue"]}, VQA_ROWS[1]]
    paths = {kind: write_every_format(tmp_path / kind, rows) for kind, rows in
             (("caption", captions), ("vqa", questions), ("instruction", INSTRUCTION_ROWS))}
    data = read_custom(paths["caption"][fmt])
    source = CustomSource(data)
    assert source.num_samples == 3 and source.num_units == (2 if fmt == "brace" else 1)
    (batch,) = batches_of(data, 3, text_fn=custom_text_cleaner("caption", None))
    assert sorted(batch["text"]) == ["a red square", "blue", "red"]
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    ids = dict(zip(batch["text"], batch["image_ids"].tolist()))
    assert ids["a red square"] == ids["red"] != ids["blue"]   # one image id per image

    (batch,) = batches_of(read_custom(paths["vqa"][fmt]), 2)
    by_question = {t: i for i, t in enumerate(batch["text"])}
    first = by_question["What colour?"]
    assert batch["answers"][first] == ["blue", "navy"] and batch["weights"][first] == pytest.approx([2 / 3, 1 / 3])
    assert batch["text_output"][first] == "blue"
    assert batch["answers"][1 - first] == ["yes"] and batch["weights"][1 - first] == [1.0]

    (batch,) = batches_of(read_custom(paths["instruction"][fmt]), 2)
    pairs = dict(zip(batch["text"], batch["text_output"]))
    assert pairs == {"Describe the image.": "A green field.",
                     "Describe the image.\nA blue square.\nAnd its colour?": "Blue."}
