"""Write the embedding example's data: invented product names, each with a catalogue description.

The names are made of syllables no model has seen as product names, so the built-in encoder cannot
tell which description a query like "I am looking for the zelvorin" means: its recall@1 starts near
chance. Training queries use three phrasings per product; the validation queries use a fourth, so
the after-training numbers measure the name -> description mapping, not a memorised sentence.
Deterministic (seeded); run `python examples/data/make_embedding.py` to rewrite the files beside it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYLLABLES = ["zel", "vor", "brin", "tak", "quo", "rix", "mep", "lun", "daf", "sor", "kel", "ombi", "trav", "nus",
             "pell", "gri", "vash", "yun", "fro", "bek"]
COLOURS = ["red", "blue", "green", "black", "white", "yellow", "grey", "orange"]
MATERIALS = ["steel", "oak", "leather", "cotton", "glass", "ceramic", "bamboo", "wool"]
ITEMS = [("kettle", "boiling water"), ("backpack", "day hikes"), ("lamp", "reading at night"),
         ("chair", "a home office"), ("mug", "hot drinks"), ("scarf", "cold winters"), ("knife", "cutting bread"),
         ("bowl", "serving salad"), ("clock", "a kitchen wall"), ("bench", "a small garden")]
TRAIN_QUERIES = ["what is the {name}?", "tell me about the {name}", "{name} product details"]
VALIDATION_QUERY = "I am looking for the {name}, which item is it?"
PRODUCTS, DISTRACTORS = 120, 40


def names(rng: random.Random, n: int) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.sample(SYLLABLES, 2)) + rng.choice(["a", "in", "ex", "o", "ium"]))
    return sorted(out)


def descriptions(rng: random.Random, n: int) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        item, use = rng.choice(ITEMS)
        out.add(f"A {rng.choice(COLOURS)} {rng.choice(MATERIALS)} {item} for {use}")
    return sorted(out)


def main(folder: Path = Path(__file__).parent) -> None:
    rng = random.Random(18)
    products = names(rng, PRODUCTS)
    texts = descriptions(rng, PRODUCTS + DISTRACTORS)
    rng.shuffle(texts)
    described, distractors = texts[:PRODUCTS], texts[PRODUCTS:]
    train, validation = [], []
    for name, text in zip(products, described):
        for template in TRAIN_QUERIES:
            # The other products' descriptions in the micro-batch are the negatives (no hard negative: a
            # step then encodes half the texts, which keeps the example within minutes on a CPU).
            train.append({"query": template.format(name=name), "positive": text})
        validation.append({"query": VALIDATION_QUERY.format(name=name), "positive": text})
    rng.shuffle(train)
    for file, rows in (("embedding_train.jsonl", train), ("embedding_validation.jsonl", validation),
                       ("embedding_corpus.jsonl", [{"text": t} for t in distractors])):
        (folder / file).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
