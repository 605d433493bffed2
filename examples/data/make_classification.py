"""Write the classification example's data: six intents of a home assistant, phrased by templates.

Validation uses phrasings (templates) and slot words never seen in training, so its accuracy measures
whether the model learned the intent, not the sentence. Deterministic: rerun to get the same files.
Usage: python examples/data/make_classification.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
# intent -> (training templates, held-out templates), each filled with a slot word
INTENTS = {
    "weather": (["what's the weather like in {x}", "will it rain in {x} tomorrow", "is it cold in {x} today",
                 "forecast for {x} please", "do I need an umbrella in {x}", "how hot will it get in {x}"],
                ["tell me if it will be sunny in {x}", "any snow expected in {x} this week",
                 "what temperature is it outside in {x}"]),
    "music": (["play some {x}", "put on {x} music", "I want to listen to {x}", "start a {x} playlist",
               "shuffle my {x} songs", "can you play {x} for me"],
              ["queue up a few {x} tracks", "I'm in the mood for {x}, turn it on", "blast some {x} in the kitchen"]),
    "alarm": (["wake me up at {x}", "set an alarm for {x}", "alarm at {x} tomorrow", "I need to get up at {x}",
               "create a {x} alarm", "ring me at {x} in the morning"],
              ["make sure I'm awake by {x}", "get me out of bed at {x}", "schedule a wake-up call for {x}"]),
    "shopping": (["add {x} to my shopping list", "we are out of {x}", "put {x} on the grocery list",
                  "remind me to buy {x}", "I need to pick up {x}", "don't let me forget {x} at the store"],
                 ["note that we should get more {x}", "the fridge has no {x} left", "grab {x} next time at the market"]),
    "lights": (["turn off the lights in the {x}", "switch on the {x} lamp", "dim the {x} lights",
                "make the {x} brighter", "lights on in the {x}", "kill the lights in the {x}"],
               ["it's too dark in the {x}", "can you lower the brightness in the {x}", "power down the {x} lighting"]),
    "translate": (["how do you say hello in {x}", "translate good morning into {x}", "what is cat in {x}",
                   "say thank you in {x}", "translate this sentence to {x}", "what's the {x} word for water"],
                  ["I need this phrase in {x}", "help me write goodbye in {x}", "convert 'see you soon' into {x}"]),
}
SLOTS = {
    "weather": (["Paris", "London", "Tokyo", "Berlin", "Madrid", "Chicago", "Sydney", "Toronto"],
                ["Oslo", "Lima", "Cairo", "Seoul"]),
    "music": (["jazz", "rock", "hip hop", "classical", "reggae", "blues", "metal", "country"],
              ["techno", "salsa", "folk", "punk"]),
    "alarm": (["6 am", "7:30", "5:45", "8 o'clock", "noon", "6:15", "9 am", "quarter past seven"],
              ["half past six", "4:50", "10 am", "seven sharp"]),
    "shopping": (["milk", "eggs", "bread", "coffee", "apples", "rice", "butter", "cheese"],
                 ["bananas", "olive oil", "yogurt", "flour"]),
    "lights": (["kitchen", "bedroom", "living room", "hallway", "garage", "office", "bathroom", "porch"],
               ["attic", "basement", "nursery", "dining room"]),
    "translate": (["French", "Spanish", "German", "Italian", "Japanese", "Portuguese", "Dutch", "Russian"],
                  ["Greek", "Swedish", "Korean", "Turkish"]),
}


def rows(held_out: bool, rng: random.Random) -> list[dict]:
    out = []
    for intent, templates in INTENTS.items():
        words = SLOTS[intent][held_out]
        for template in templates[held_out]:
            for word in words:
                out.append({"text": template.format(x=word), "label": intent})
    rng.shuffle(out)
    return out


def main() -> None:
    rng = random.Random(0)
    for name, held_out in (("classification_train.jsonl", False), ("classification_test.jsonl", True)):
        data = rows(held_out, rng)
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in data))
        print(f"{HERE / name}: {len(data)} records")


if __name__ == "__main__":
    main()
