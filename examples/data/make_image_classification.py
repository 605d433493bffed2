"""Draw the bundled image classification data and write the tiny ViT it trains.

Three classes by colour: red, green, blue, each a circle, square or triangle of random shade, size and
place on a random grey background (so shape and place say nothing). Writes
``image_classification/train/<colour>/*.png`` (40 per class) and ``image_classification/test/<colour>/*.png``
(12 per class), and ``image_classification/tiny-vit/``: a randomly initialised ViT (32x32 pixels, 8x8
patches, 2 layers of width 64) with its image processor, since no pretrained vision model ships with
tuneforge. Deterministic: a rerun rewrites the same files.

Usage: python examples/data/make_image_classification.py
"""

import random
from pathlib import Path

from PIL import Image, ImageDraw

SEED = 7
SIZE = 32
PER_CLASS = {"train": 40, "test": 12}
OUT = Path(__file__).parent / "image_classification"
COLOURS = ("red", "green", "blue")


def draw(colour: str, rng: random.Random) -> Image.Image:
    grey = rng.randint(60, 200)
    im = Image.new("RGB", (SIZE, SIZE), (grey, grey, grey))
    fill = [rng.randint(0, 90) for _ in range(3)]
    fill[COLOURS.index(colour)] = rng.randint(170, 255)
    side = rng.randint(12, 24)
    x, y = rng.randint(0, SIZE - side), rng.randint(0, SIZE - side)
    pen = ImageDraw.Draw(im)
    shape = rng.choice(("circle", "square", "triangle"))
    if shape == "circle":
        pen.ellipse((x, y, x + side, y + side), fill=tuple(fill))
    elif shape == "square":
        pen.rectangle((x, y, x + side, y + side), fill=tuple(fill))
    else:
        pen.polygon([(x + side // 2, y), (x, y + side), (x + side, y + side)], fill=tuple(fill))
    return im


def write_images() -> None:
    rng = random.Random(SEED)
    for split, n in PER_CLASS.items():
        for colour in COLOURS:
            folder = OUT / split / colour
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw(colour, rng).save(folder / f"{i:03d}.png", optimize=True)


def write_model() -> None:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    torch.manual_seed(SEED)
    config = ViTConfig(image_size=SIZE, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, num_labels=3)
    ViTForImageClassification(config).save_pretrained(OUT / "tiny-vit")
    ViTImageProcessorPil(size={"height": SIZE, "width": SIZE}).save_pretrained(OUT / "tiny-vit")


if __name__ == "__main__":
    write_images()
    write_model()
    print(f"wrote {OUT}")
