"""task: image_classification on a tiny random ViT and red/blue squares the tests draw themselves."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tuneforge.config import config_from_dict
from tuneforge.data.images import check_images, load_image_processor, prepare_images
from tuneforge.errors import DataError
from tuneforge.methods.build import build_objective
from tuneforge.models.load import load_model
from tuneforge.track.console import Reporter
from tuneforge.train.loop import train

QUIET = Reporter(quiet=True)
CPU = torch.device("cpu")
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def draw(path, colour, i: int) -> None:
    """A grey canvas with a coloured square whose size and place vary with i."""
    im = Image.new("RGB", (40, 40), (128, 128, 128))
    im.paste(Image.new("RGB", (14 + i, 14 + i), colour), ((3 * i) % 20, (7 * i) % 20))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    folder = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=5)  # a head of another size: replaced by a new one
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for name, colour in COLOURS.items():
        for i in range(6):
            draw(root / name / f"{i}.png", colour, i)
    return root


def make_cfg(tmp_path, vit, data, **over):
    raw = {"task": "image_classification", "base_model": str(vit), "datasets": [{"path": str(data)}],
           "validation": {"path": str(data)}, "adapter": "full", "learning_rate": 2e-3, "micro_batch_size": 4,
           "max_steps": 12, "warmup_steps": 0, "output_dir": str(tmp_path / "run"), "device": "cpu",
           "precision": "fp32", "on_bad_record": "skip", "max_bad_fraction": 0.5, **over}
    return config_from_dict(raw, base=tmp_path)


def test_loss_equals_the_models_own_loss(tmp_path, vit, images, one_thread):
    cfg = make_cfg(tmp_path, vit, images, image_classification={"augment": False})
    processor = load_image_processor(vit)
    data = prepare_images(cfg, processor)
    assert data.labels == ["blue", "red"]
    model = load_model(vit, CPU, head="image_classifier", head_config=data.head_config)
    assert model.config.id2label == {0: "blue", 1: "red"}
    objective = build_objective(cfg, data, None, tokenizer=processor, device=CPU, dtype=torch.float32)
    batch = objective.collate(list(range(len(data.train))))
    ours, stats = objective.loss(model, batch, objective.units(batch))
    theirs = model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert 0 <= stats["accuracy"][0] <= stats["accuracy"][1] == len(data.train)


def test_augmentation_is_a_function_of_the_place_in_the_run(tmp_path, vit, images, one_thread):
    cfg = make_cfg(tmp_path, vit, images)
    processor = load_image_processor(vit)
    objective = build_objective(cfg, prepare_images(cfg, processor), None, tokenizer=processor, seed=cfg.seed)
    batches = [objective.collate(list(range(8)), place)["pixel_values"] for place in ((3, 1), (3, 1), (4, 0))]
    assert torch.equal(batches[0], batches[1])
    assert not torch.equal(batches[0], batches[2])  # some image flipped differently at another step


def test_an_image_that_does_not_open_is_named(tmp_path, vit, images):
    broken = tmp_path / "data"
    for name in COLOURS:
        for i in range(3):
            draw(broken / name / f"{i}.png", COLOURS[name], i)
    (broken / "red" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"red/bad\.png: the image does not open"):
        prepare_images(make_cfg(tmp_path, vit, broken, on_bad_record="error"))
    data = prepare_images(make_cfg(tmp_path, vit, broken))
    assert len(data.train) == 6 and [r.source for r in data.rejected if "bad.png" in r.source]


def test_jsonl_labels_and_bad_records_with_file_and_line(tmp_path, vit, images):
    lines = [{"image": str(images / "red" / f"{i}.png"), "label": "red"} for i in range(3)]
    lines += [{"image": str(images / "blue" / f"{i}.png"), "label": "blue"} for i in range(3)]
    lines += [{"image": "missing.png", "label": "red"}, {"image": "x.png", "label": ["red", "blue"]}]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.raises(DataError) as err:
        prepare_images(make_cfg(tmp_path, vit, path, on_bad_record="error"))
    assert f"{path}:7: the image does not open" in str(err.value)
    assert f"{path}:8: the image does not open" in str(err.value)  # a list label is multi-label data, not an error
    data = prepare_images(make_cfg(tmp_path, vit, path, validation=None))
    assert (len(data.train), data.labels, sorted(r.line for r in data.rejected)) == (6, ["blue", "red"], [7, 8])


def test_training_learns_the_colours_and_the_pipeline_reads_final(tmp_path, vit, images, one_thread):
    from transformers import pipeline

    data = tmp_path / "data"
    for name in COLOURS:
        for i in range(6):
            draw(data / name / f"{i}.png", COLOURS[name], i)
    (data / "blue" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    cfg = make_cfg(tmp_path, vit, data)
    manifest = train(cfg, reporter=QUIET)
    before, after = manifest["eval_before"], manifest["eval_after"]
    assert before["accuracy"] <= 0.75 and after["accuracy"] == 1.0 and after["val_loss"] < before["val_loss"]
    rejected = [json.loads(x) for x in (tmp_path / "run" / "rejected.jsonl").read_text().splitlines()]
    assert {r["file"] for r in rejected} == {str(data / "blue" / "broken.jpg")}  # as training and validation image

    classify = pipeline("image-classification", model=str(tmp_path / "run" / "final"))
    for name in COLOURS:
        assert classify(str(data / name / "1.png"))[0]["label"] == name


def test_lora_trains_the_head_and_merges_for_the_pipeline(tmp_path, vit, images, one_thread):
    from transformers import pipeline

    from tuneforge.export.run_export import export_run
    from tuneforge.models.run import open_run

    cfg = make_cfg(tmp_path, vit, images, adapter="lora", learning_rate=1e-2, lora={"r": 4, "alpha": 8})
    manifest = train(cfg, reporter=QUIET)
    assert manifest["eval_after"]["accuracy"] == 1.0
    saved = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in saved and any("lora_A" in k for k in saved)  # the new head, whole
    out = export_run(open_run(tmp_path / "run"), "hf", tmp_path / "merged", dtype="float32")
    classify = pipeline("image-classification", model=str(out))
    for name in COLOURS:
        assert classify(str(images / name / "2.png"))[0]["label"] == name


def test_resume_is_bit_exact(tmp_path, vit, images, one_thread):
    whole = make_cfg(tmp_path, vit, images, max_steps=6, save_every=3, output_dir=str(tmp_path / "a"),
                     evaluation={"before_after": False})
    train(whole, reporter=QUIET)
    split = make_cfg(tmp_path, vit, images, max_steps=6, save_every=3, output_dir=str(tmp_path / "b"),
                     evaluation={"before_after": False})
    assert train(split, reporter=QUIET, stop_after=3) == {"stopped_at": 3}
    train(split, resume=True, reporter=QUIET)
    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_data_check_and_plan_on_an_image_folder(tmp_path, vit, images):
    from tuneforge.cli import main

    data = tmp_path / "data"
    for i in range(4):
        draw(data / "red" / f"{i}.png", COLOURS["red"], i)
    draw(data / "blue" / "0.png", COLOURS["blue"], 0)
    (data / "red" / "bad.webp").write_bytes(b"RIFF")
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"task": "image_classification", "base_model": str(vit),
                                  "datasets": [{"path": str(data)}], "output_dir": str(tmp_path / "run")}))
    report = check_images(config_from_dict(json.loads(config.read_text()), base=tmp_path))
    assert [(f.code, f.source) for f in report.findings] == [("bad-record", str(data / "red" / "bad.webp"))]
    assert report.records["training images of class red"] == 4
    report = check_images(config_from_dict(json.loads(config.read_text()) | {"image_classification": {
        "labels": ["red", "blue", "green"]}}, base=tmp_path))
    assert {f.code for f in report.findings} == {"bad-record", "missing-class"}
    assert main(["plan", str(config), "--json"]) == 0


def test_two_micro_batches_make_the_gradient_of_one_batch(tmp_path, vit, images, one_thread):
    from tuneforge.train.loop import accumulate_gradients

    cfg = make_cfg(tmp_path, vit, images, image_classification={"augment": False})
    processor = load_image_processor(vit)
    data = prepare_images(cfg, processor)
    model = load_model(vit, CPU, head="image_classifier", head_config=data.head_config)
    objective = build_objective(cfg, data, None, tokenizer=processor, device=CPU, dtype=torch.float32)
    grads = []
    for split in ([[0, 1, 2, 3, 4, 5, 6]], [[0, 1, 2], [3, 4, 5, 6]]):  # unequal halves: averaged by images
        model.zero_grad()
        loss, totals, _ = accumulate_gradients(objective, model, [objective.collate(i) for i in split], CPU, torch.float32)
        grads.append((loss, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    assert totals["examples"] == 7 and abs(grads[0][0] - grads[1][0]) < 1e-6
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_serve_classifies_images_sent_as_base64_as_the_pipeline_does(tmp_path, vit, images, one_thread):
    """/v1/classify of an image run takes base64 bytes or data URLs, answers the image pipeline's labels and
    scores, and refuses paths, URLs, non-images and oversized images by entry, without opening any."""
    import base64
    import threading
    import urllib.error
    import urllib.request

    from transformers import pipeline

    from tuneforge.serve import make_server
    from tuneforge.serve.classify import MAX_IMAGE_BYTES

    cfg = make_cfg(tmp_path, vit, images, max_steps=2, evaluation={"before_after": False})
    train(cfg, reporter=QUIET)
    files = [images / "red" / "1.png", images / "blue" / "2.png"]
    raw = [base64.b64encode(f.read_bytes()).decode() for f in files]
    classify = pipeline("image-classification", model=str(tmp_path / "run" / "final"))
    server = make_server(tmp_path / "run", port=0, quiet=True, device="cpu")
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def post(body: dict) -> dict:
        req = urllib.request.Request(server.url.removesuffix("/v1") + "/v1/classify", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())["data"]

    def refused(value) -> str:
        with pytest.raises(urllib.error.HTTPError) as err:
            post({"input": value})
        assert err.value.code == 400
        return json.loads(err.value.read())["error"]["message"]

    def same(a, b) -> bool:
        if isinstance(a, list):
            return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a["label"] == b["label"] and abs(a["score"] - b["score"]) < 1e-5

    try:
        one = post({"input": "data:image/png;base64," + raw[0]})
        assert same(one, classify(str(files[0]), top_k=1))
        assert same(post({"input": raw, "top_k": None}), classify([str(f) for f in files], top_k=2))
        assert "paths and URLs are not opened" in refused(str(files[0]))
        assert "paths and URLs are not opened" in refused("https://example.com/cat.png")
        assert "input[1]: the image does not open" in refused([raw[0], base64.b64encode(b"not an image").decode()])
        assert "over 2 MiB" in refused(base64.b64encode(b"\0" * (MAX_IMAGE_BYTES + 3)).decode())
    finally:
        server.shutdown()
        server.server_close()
    server = make_server(tmp_path / "run" / "final", port=0, quiet=True, device="cpu")  # the model folder alone
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert same(post({"input": raw, "top_k": None}), classify([str(f) for f in files], top_k=2))
    finally:
        server.shutdown()
        server.server_close()


def multi_label_images(tmp_path):
    """12 images as JSONL: a red square, a blue one, or both, in turn (8 show red, 8 show blue)."""
    lines = []
    for i in range(12):
        kind = ("red", "blue", "both")[i % 3]
        im = Image.new("RGB", (40, 40), (128, 128, 128))
        if kind != "blue":
            im.paste(Image.new("RGB", (12, 12), COLOURS["red"]), (2 + i % 4, 2))
        if kind != "red":
            im.paste(Image.new("RGB", (12, 12), COLOURS["blue"]), (24, 24 - i % 4))
        im.save(tmp_path / f"{i}.png")
        lines.append({"image": f"{i}.png", "label": ["red", "blue"] if kind == "both" else [kind]})
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_the_console_counts_every_class_of_a_multi_label_image(tmp_path, vit):
    from io import StringIO

    from rich.console import Console

    cfg = make_cfg(tmp_path, vit, multi_label_images(tmp_path))
    processor = load_image_processor(vit)
    out = StringIO()
    Reporter(Console(file=out, width=200)).data_summary(prepare_images(cfg, processor), cfg, tmp_path, processor)
    assert "12 train examples: blue 8, red 8" in out.getvalue()
    assert "12 validation examples: blue 8, red 8" in out.getvalue()


def test_multi_label_images_train_with_a_sigmoid_per_class(tmp_path, vit, one_thread):
    """List labels make multi-label data: ViT's own multi-label loss, per-class metrics and the threshold before
    and after, final/ read by the image pipeline with sigmoid scores, and data check counting every class."""
    from transformers import pipeline

    cfg = make_cfg(tmp_path, vit, multi_label_images(tmp_path), image_classification={"augment": False, "threshold": 0.4})
    processor = load_image_processor(vit)
    data = prepare_images(cfg, processor)
    assert data.multi_label and data.labels == ["blue", "red"] and data.train[2].targets == {0, 1}
    model = load_model(vit, CPU, head="image_classifier", head_config=data.head_config)
    objective = build_objective(cfg, data, None, tokenizer=processor, device=CPU, dtype=torch.float32)
    batch = objective.collate([0, 1, 2, 3])
    ours, _ = objective.loss(model, batch, {"examples": 4})
    theirs = model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
    assert model.config.problem_type == "multi_label_classification"
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)

    manifest = train(cfg, reporter=QUIET)
    after = json.loads((tmp_path / "run" / "eval_after.json").read_text())
    assert after["threshold"] == 0.4 and set(after["per_class"]) == {"blue", "red"}
    assert after["val_loss"] < manifest["eval_before"]["val_loss"]
    scores = pipeline("image-classification", model=str(tmp_path / "run" / "final"))(str(tmp_path / "2.png"), top_k=None)
    assert {s["label"] for s in scores} == {"blue", "red"} and abs(sum(s["score"] for s in scores) - 1) > 1e-3
    report = check_images(cfg)
    assert report.records["training images of class red"] == 8 and not report.findings


def test_a_photo_is_read_the_right_way_up_as_the_pipeline_reads_it(tmp_path):
    """EXIF orientation 6 (a phone held upright): training pixels are the pipeline's, not the sensor's."""
    from transformers.image_utils import load_image

    from tuneforge.data.images import open_rgb

    im = Image.new("RGB", (40, 20), (200, 10, 10))
    im.paste(Image.new("RGB", (10, 20), (10, 10, 200)), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    ours, theirs = open_rgb(str(tmp_path / "photo.jpg")), load_image(str(tmp_path / "photo.jpg"))
    assert ours.size == theirs.size == (20, 40) and ours.tobytes() == theirs.tobytes()
