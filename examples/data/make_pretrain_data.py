"""Generate the bundled pre-training corpus: short children's stories from a small grammar.

Writes ``data/stories.txt`` next to this script: about 290 KB of stories, one per paragraph
(separated by a blank line, which is how tuneforge reads documents out of a .txt file), and
``data/story_chat.jsonl``: a tiny chat set for the example's second (SFT) stage, each a request
for a story about a child and a thing, answered by a new story of the same grammar about them. The
grammar has enough structure (characters, objects, places, a problem and its resolution, names
carried through a story) that a small model learns it well within minutes on a CPU, and a model
that learned it writes stories that plainly look like these. Deterministic: rerunning rewrites the
file byte-identically.

Usage: python examples/data/make_pretrain_data.py
"""

import json
import random
import re
from pathlib import Path

SEED = 19
N_STORIES = 700
CHAT_SEED = 20
N_CHATS = 120

NAMES = ["Tom", "Anna", "Ben", "Lily", "Max", "Sue", "Sam", "Mia", "Leo", "Zoe", "Tim", "Eva", "Jack", "Rosa"]
ANIMALS = ["cat", "dog", "bird", "frog", "duck", "rabbit", "fox", "bear"]
THINGS = ["ball", "kite", "red hat", "little boat", "blue cup", "book", "toy car", "doll", "drum", "yellow box"]
PLACES = ["the park", "the garden", "the beach", "the forest", "the big hill", "the farm", "the lake", "school"]
FEELINGS = ["happy", "sad", "scared", "angry", "tired", "excited"]
WEATHER = ["The sun was warm.", "It was a windy day.", "It was raining.", "The sky was blue.", "It was cold."]
HIDING = ["under the bed", "behind a tree", "in the grass", "near the water", "on the roof", "in a big hole"]


def story(r: random.Random) -> str:
    a, b = r.sample(NAMES, 2)
    thing, place, animal = r.choice(THINGS), r.choice(PLACES), r.choice(ANIMALS)
    lines = [f"Once upon a time, there was a child named {a}. {a} had a {thing}.",
             f"{a} loved the {thing} very much.", r.choice(WEATHER),
             f"One day, {a} went to {place} with a friend named {b}."]
    kind = r.randrange(3)
    if kind == 0:
        where = r.choice(HIDING)
        lines += [f"{a} played with the {thing}, but then the {thing} was gone!", f"{a} felt {r.choice(FEELINGS[1:4])}.",
                  f"{b} said, \"Do not worry, {a}. We will find it.\"",
                  f"They looked and looked. At last {b} found the {thing} {where}.",
                  f"{a} said, \"Thank you, {b}!\" They were happy again."]
    elif kind == 1:
        lines += [f"At {place}, they saw a little {animal}. The {animal} was {r.choice(FEELINGS)}.",
                  f"\"Can we help the {animal}?\" asked {b}.",
                  f"{a} gave the {animal} some food. The {animal} ate it all.",
                  f"The {animal} became their friend, and they played until the sun went down."]
    else:
        lines += [f"{b} wanted to play with the {thing} too.", f"{a} did not want to share. {b} was sad.",
                  f"Then {a} saw that {b} was sad and said, \"You can play with my {thing}.\"",
                  f"They played together all day. Sharing made them both {r.choice(['happy', 'excited'])}."]
    lines.append(r.choice([f"{a} and {b} went home. The end.", "The end.", f"That night, {a} slept well."]))
    return " ".join(lines)


def chat(r: random.Random) -> dict:
    """A request naming a story's child and thing, answered by that story."""
    text = story(r)
    who, thing = re.match(r"Once upon a time, there was a child named (\w+)\. \1 had a ([\w ]+)\.", text).groups()
    ask = r.choice(["Tell me a story about {} and the {}.", "Can you tell a story about {} and a {}?"])
    return {"messages": [{"role": "user", "content": ask.format(who, thing)}, {"role": "assistant", "content": text}]}


def main() -> None:
    r = random.Random(SEED)
    out = Path(__file__).parent / "stories.txt"
    out.write_text("\n\n".join(story(r) for _ in range(N_STORIES)) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    r = random.Random(CHAT_SEED)
    chats = Path(__file__).parent / "story_chat.jsonl"
    chats.write_text("".join(json.dumps(chat(r)) + "\n" for _ in range(N_CHATS)))
    print(f"wrote {chats} ({chats.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
