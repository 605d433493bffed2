"""Write the bundled alignment demos' data (deterministic; rerun to regenerate).

- preference_{train,test}.jsonl: questions about people's favourite things, answered correctly
  on both sides; the chosen answer closes with an offer to help further, the rejected one with a
  curt sign-off. Both endings are short and natural, so the base model has no strong preference
  between them. Test names never appear in training.
- arithmetic_{train,test}.jsonl: small additions for GRPO, with the answer for the reward.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
FIRST = ["Ada", "Bela", "Cyrus", "Dana", "Emil", "Farah", "Gus", "Hana", "Ivo", "Jade", "Kofi", "Lena", "Milo",
         "Nora", "Otto", "Pia", "Quin", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wes", "Xena", "Yuri", "Zoe"]
LAST = ["Abbott", "Brandt", "Costa", "Dietz", "Ekman", "Fodor", "Gallo", "Haas", "Ishii", "Jensen", "Kovac",
        "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov", "Quist", "Reyes", "Sato", "Tanaka"]
THINGS = {"colour": ["blue", "green", "red", "yellow", "purple", "orange"],
          "fruit": ["apple", "mango", "pear", "banana", "cherry", "plum"],
          "animal": ["cat", "owl", "horse", "otter", "fox", "dolphin"],
          "sport": ["tennis", "rowing", "chess", "cycling", "judo", "golf"]}
WARM = ["Anything else I can help with?", "Happy to help with more.", "Let me know if you need more."]
CURT = ["That is all.", "Goodbye.", "Next question."]


def people(rng: random.Random, names: list[str], n: int) -> list[dict]:
    out = []
    for _ in range(n):
        name = rng.choice(names)
        kind = rng.choice(sorted(THINGS))
        value = rng.choice(THINGS[kind])
        prompt = f"{name}'s favourite {kind} is {value}. What is {name}'s favourite {kind}?"
        answer = f"{name}'s favourite {kind} is {value}."
        out.append({"prompt": prompt, "chosen": f"{answer} {rng.choice(WARM)}", "rejected": f"{answer} {rng.choice(CURT)}"})
    return out


def additions(rng: random.Random, n: int, seen: set) -> list[dict]:
    out = []
    while len(out) < n:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        out.append({"prompt": f"What is {a} + {b}? Reply with the number only.", "answer": str(a + b)})
    return out


def write(name: str, rows: list[dict]) -> None:
    with open(HERE / name, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    rng = random.Random(0)
    full = [f"{f} {l}" for f in FIRST for l in LAST]
    rng.shuffle(full)
    test_names, train_names = full[:60], full[60:]
    write("preference_train.jsonl", people(rng, train_names, 240))
    write("preference_test.jsonl", people(rng, test_names, 60))
    seen: set = set()
    write("arithmetic_test.jsonl", additions(rng, 16, seen))
    write("arithmetic_train.jsonl", additions(rng, 48, seen))


if __name__ == "__main__":
    main()
