"""`POST /v1/classify` for classifier runs: texts (or images) in, labels with scores out, in transformers'
pipeline shape.

Body: {"input": "a text" | ["text", ...], "top_k": 1 (default) | n | null (every class), "model": optional}.
The answer's "data" is what `pipeline("text-classification")(input, top_k=...)` returns: for one text with
top_k 1 a list of one {"label", "score"}; for a list of texts, one entry per text (a dict with top_k 1, else a
list of dicts). Scores are softmax probabilities, or per-class sigmoids for a multi-label model.

A reward run (`method: reward`, one output) answers in the same shape, as the pipeline does for one label: its
one label ("LABEL_0") with the sigmoid of the score as "score", plus "reward": the score head's raw output, the
number a reward model is used for (ranking answers, RL). It also takes conversations: serve/rewards.py.

An image classifier takes images as their bytes in base64, raw or as a data URL
("data:image/png;base64,..."), at most MAX_IMAGE_BYTES each, and answers what
`pipeline("image-classification")(images, top_k=...)` returns: a list of {"label", "score"} per image. A path
or a URL is refused, never opened or fetched: the server reads only what the request carries.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from typing import Callable

import torch

from tuneforge.data.images import as_rgb, pil
from tuneforge.serve.protocol import ApiError
from tuneforge.serve.rewards import reward_batch, reward_inputs, reward_scores

MAX_TEXTS = 256  # texts in one request: a bigger batch is a client that should page
MAX_IMAGES = 32  # images in one request
MAX_IMAGE_BYTES = 2 * 1024 * 1024  # one image's bytes, decoded (its base64 fits the default 4 MiB body)
MAX_IMAGE_PIXELS = 40_000_000  # width x height an image may claim before it is decoded (a decompression bomb)
DATA_URL = re.compile(r"data:image/[\w.+-]+;base64,", re.ASCII)


def text_inputs(given: list) -> list[str]:
    """The texts of a request; 400 unless every one is a non-empty string."""
    if not all(isinstance(t, str) and t for t in given):
        raise ApiError(400, "input: give a non-empty string or a list of non-empty strings", param="input")
    if len(given) > MAX_TEXTS:
        raise ApiError(400, f"input: {len(given)} texts; send at most {MAX_TEXTS} per request", param="input")
    return given


def image_inputs(given: list) -> list:
    """The images of a request as RGB Pillow images, as the pipeline reads them (EXIF orientation applied);
    400 naming the entry for anything that is not base64 image bytes within the limits."""
    if len(given) > MAX_IMAGES:
        raise ApiError(400, f"input: {len(given)} images; send at most {MAX_IMAGES} per request", param="input")
    return [_image(item, i) for i, item in enumerate(given)]


def _image(item, i: int):
    where = f"input[{i}]"
    if not isinstance(item, str) or not item:
        raise ApiError(400, f"{where}: give an image as base64 bytes or a data:image/...;base64, URL", param="input")
    match = DATA_URL.match(item)
    encoded = item[match.end():] if match else item
    try:
        data = base64.b64decode("".join(encoded.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: is not base64 image bytes or a data:image/...;base64, URL (paths and URLs "
                       "are not opened: send the file's bytes, e.g. base64.b64encode(open(f, 'rb').read()))",
                       param="input") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise ApiError(400, f"{where}: the image is over {MAX_IMAGE_BYTES // 2**20} MiB; send a smaller one",
                       param="input")
    PIL = pil()
    try:
        with PIL.Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ApiError(400, f"{where}: {im.width}x{im.height} pixels is over the {MAX_IMAGE_PIXELS:,} "
                               "this server decodes; send a smaller image", param="input")
            return as_rgb(im)
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as err:
        raise ApiError(400, f"{where}: the image does not open ({err})", param="input") from None


def parse_classify(body: dict, read: Callable[[list], list] = text_inputs) -> tuple[str | None, list, bool, int | None]:
    """(model, inputs, one input given, top_k) of a request body, the inputs checked by `read` (text_inputs or
    image_inputs); ApiError 400 naming the field otherwise."""
    given = body.get("input")
    single = isinstance(given, (str, dict))
    given = [given] if single else given
    if not isinstance(given, list) or not given:
        raise ApiError(400, "input: give a non-empty string or a list of non-empty strings", param="input")
    inputs = read(given)
    top_k = body.get("top_k", 1)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ApiError(400, "top_k: give a positive integer, or null for every class", param="top_k")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "model: must be a string", param="model")
    return model, inputs, single, top_k


def text_batch(tokenizer, model, texts: list[str], end_of_turn: str | None = None) -> dict:
    """Token ids of the texts, truncated to what the model reads."""
    limit = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    return tokenizer(texts, padding=True, truncation=True, max_length=min(limit, tokenizer.model_max_length),
                     return_tensors="pt")


def image_batch(processor, model, images: list, end_of_turn: str | None = None) -> dict:
    """pixel_values of the images through the model's own processor, as the pipeline computes them."""
    return {"pixel_values": processor(images=images, return_tensors="pt")["pixel_values"]}


@torch.no_grad()
def class_scores(model, batch: dict, device) -> tuple[torch.Tensor, None]:
    """Probabilities of every class for each input (fp32, on the CPU), and no fields beside them."""
    logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    multi = model.config.problem_type == "multi_label_classification"
    return (torch.sigmoid(logits) if multi else torch.softmax(logits, -1)), None


@dataclass(frozen=True)
class Inputs:
    """What a classifier head reads from a request, how it becomes a batch, and how its pipeline shapes an answer."""

    read: Callable[[list], list]  # request inputs -> checked inputs (400 otherwise)
    # (tokenizer or image processor, model, inputs, the run's end-of-turn) -> the model's keyword arguments
    batch: Callable
    one_per_input: bool  # top_k 1 answers a dict per input (text pipeline), not a list of one (image pipeline)
    # (model, batch, device) -> (probabilities [inputs, classes], fields added to each input's entries, or None)
    scores: Callable = class_scores


# The heads /v1/classify serves (models/load.py HEADS; serve/heads.py SERVED), and what each takes.
INPUTS = {"classifier": Inputs(text_inputs, text_batch, True),
          "image_classifier": Inputs(image_inputs, image_batch, False),
          "score": Inputs(reward_inputs, reward_batch, True, reward_scores)}  # serve/rewards.py


def pipeline_shape(probs: torch.Tensor, id2label: dict, single: bool, top_k: int | None,
                   one_per_input: bool = True, fields: list[dict] | None = None) -> list:
    """Labels with scores, best first, shaped as transformers' classification pipelines return them; `fields`
    (one dict per input) are added to that input's entries."""
    k = probs.size(-1) if top_k is None else min(top_k, probs.size(-1))
    rows = []
    for n, row in enumerate(probs):
        scores, idx = row.topk(k)
        extra = fields[n] if fields else {}
        rows.append([{"label": id2label[int(i)], "score": float(s), **extra} for s, i in zip(scores, idx)])
    if single:
        return rows[0]
    return [r[0] for r in rows] if top_k == 1 and one_per_input else rows
