"""Generate the bundled quickstart dataset for tuneforge.

The task is structured extraction: given one short sentence about a person,
answer with a fixed compact JSON object
``{"name": "<First Last>", "age": <int>, "city": "<City>"}``.

Writes ``data/quickstart_train.jsonl`` (400 records) and
``data/quickstart_test.jsonl`` (60 records) next to this script, in the
OpenAI chat fine-tuning format. Output is deterministic: rerunning the script
rewrites both files byte-identically. Test records use first names that never
appear in train, so no test person or prompt occurs in the training set.

Usage: python examples/make_quickstart_data.py
"""

import json
import random
from pathlib import Path

SEED = 1234
N_TRAIN = 400
N_TEST = 60

SYSTEM_PROMPT = "Extract the person's name, age and city. Answer with JSON only."

# 60 first names: the first 48 are used for train, the last 12 only for test.
FIRST_NAMES = [
    "Maria", "James", "Aisha", "Lucas", "Sofia", "Daniel", "Yuki", "Omar",
    "Elena", "Noah", "Priya", "Mateo", "Hannah", "Kenji", "Fatima", "Liam",
    "Chloe", "Ivan", "Amara", "Diego", "Nora", "Samuel", "Leila", "Tomas",
    "Grace", "Arjun", "Ingrid", "Felix", "Mei", "Oscar", "Zara", "Hugo",
    "Clara", "Kofi", "Lena", "Rafael", "Emma", "Ahmed", "Julia", "Pavel",
    "Isabel", "Mohamed", "Alice", "Chen", "Rosa", "Victor", "Anna", "Tariq",
    # test-only first names
    "Beatriz", "Sven", "Nadia", "Emil", "Olga", "Kwame", "Lucia", "Dmitri",
    "Hana", "Marco", "Sakura", "Jonas",
]
N_TRAIN_FIRST = 48

LAST_NAMES = [
    "Lopez", "Smith", "Khan", "Silva", "Rossi", "Mueller", "Tanaka", "Haddad",
    "Petrov", "Johnson", "Sharma", "Garcia", "Cohen", "Sato", "Okafor",
    "Brown", "Dubois", "Ivanova", "Mensah", "Fernandez", "Larsen", "Walker",
    "Nasser", "Novak", "Kim", "Patel", "Berg", "Schmidt", "Wang", "Moreau",
    "Ali", "Costa", "Weber", "Mendes", "Nguyen", "Kowalski", "Taylor",
    "Hassan", "Romano", "Jensen", "Chavez", "Murphy", "Yilmaz", "Fischer",
    "Singh", "Park", "Andersen", "Reyes", "Lindqvist", "Adeyemi", "Horvat",
    "Ortiz", "Bianchi", "Ito", "Kovacs", "Wright", "Molina", "Sorensen",
    "Hughes", "Varga",
]

CITIES = [
    "Madrid", "Paris", "London", "Berlin", "Rome", "Lisbon", "Vienna",
    "Prague", "Warsaw", "Dublin", "Oslo", "Stockholm", "Helsinki", "Athens",
    "Istanbul", "Cairo", "Nairobi", "Lagos", "Accra", "Tokyo", "Osaka",
    "Seoul", "Beijing", "Shanghai", "Mumbai", "Delhi", "Bangkok", "Jakarta",
    "Sydney", "Melbourne", "Toronto", "Chicago", "Boston", "Seattle",
    "Mexico City", "Buenos Aires", "Cape Town", "New York", "Los Angeles",
    "Rio de Janeiro",
]

# Sentence templates: {name}, {age}, {city}; facts appear in varied orders.
TEMPLATES = [
    "{name}, {age}, lives in {city}.",
    "Meet {name} from {city}; they turned {age} this year.",
    "Age {age} - {name} - based in {city}.",
    "{city} is home to {name}, who is {age} years old.",
    "Our new member {name} is {age} and moved to {city} last spring.",
    "I met {name} in {city}. They are {age}.",
    "At {age}, {name} still runs a small bakery in {city}.",
    "Profile: {name}; resides in {city}; {age} years of age.",
    "{name} ({age}) works as a nurse in {city}.",
    "Born {age} years ago, {name} now calls {city} home.",
    "Visitor from {city}: {name}, aged {age}.",
    "The {age}-year-old {name} teaches music in {city}.",
]


def make_record(rng, first_names):
    """Build one chat record from a random person and template."""
    name = f"{rng.choice(first_names)} {rng.choice(LAST_NAMES)}"
    age = rng.randint(18, 90)
    city = rng.choice(CITIES)
    sentence = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
    answer = json.dumps({"name": name, "age": age, "city": city})
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": sentence},
            {"role": "assistant", "content": answer},
        ]
    }


def make_split(rng, first_names, n, seen_prompts):
    """Generate n records whose user prompts are unique and not in seen_prompts."""
    records = []
    while len(records) < n:
        rec = make_record(rng, first_names)
        prompt = rec["messages"][1]["content"]
        if prompt in seen_prompts:
            continue
        seen_prompts.add(prompt)
        records.append(rec)
    return records


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main():
    out_dir = Path(__file__).resolve().parent / "data"
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    seen = set()
    train = make_split(rng, FIRST_NAMES[:N_TRAIN_FIRST], N_TRAIN, seen)
    test = make_split(rng, FIRST_NAMES[N_TRAIN_FIRST:], N_TEST, seen)
    write_jsonl(out_dir / "quickstart_train.jsonl", train)
    write_jsonl(out_dir / "quickstart_test.jsonl", test)
    print(f"wrote {len(train)} train and {len(test)} test records to {out_dir}")


if __name__ == "__main__":
    main()
