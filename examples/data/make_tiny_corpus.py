"""Generate tiny-corpus.jsonl: deterministic, templated English-like documents a tiny model can learn.

    python examples/data/make_tiny_corpus.py [out.jsonl] [n_docs]

Short stories, facts, recipes, weather reports and arithmetic, built from small vocabularies so that a
model with a few hundred thousand parameters visibly lowers its loss within a few hundred steps.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "June", "Kai", "Lena", "Milo", "Nora"]
ANIMALS = ["cat", "dog", "fox", "owl", "horse", "rabbit", "goat", "duck", "bear", "mouse"]
PLACES = ["the park", "the river", "the market", "the old mill", "the library", "the hill", "the harbor",
          "the forest", "the school", "the garden"]
THINGS = ["a red ball", "a blue kite", "a small boat", "a wooden box", "a green apple", "a silver key",
          "a paper map", "a warm scarf", "a tiny bell", "a yellow hat"]
FEELINGS = ["happy", "tired", "curious", "surprised", "calm", "proud", "hungry", "sleepy"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WEATHER = ["sunny", "rainy", "cloudy", "windy", "foggy", "snowy", "warm", "cold"]
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow", "blood": "red"}
CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "Egypt": "Cairo",
            "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa", "Norway": "Oslo", "Chile": "Santiago"}
FOODS = ["soup", "bread", "pancakes", "rice", "salad", "stew", "pie", "noodles"]
INGREDIENTS = ["flour", "salt", "butter", "eggs", "milk", "sugar", "onions", "carrots", "tomatoes", "beans"]
VERBS = ["mix", "stir", "bake", "boil", "chop", "pour", "fold", "heat"]


def story(r: random.Random) -> str:
    a, b = r.sample(NAMES, 2)
    animal, place, thing = r.choice(ANIMALS), r.choice(PLACES), r.choice(THINGS)
    day, feel = r.choice(DAYS), r.choice(FEELINGS)
    lines = [
        f"On {day}, {a} went to {place} with a {animal}.",
        f"There {a} found {thing} under a tree.",
        f"{b} came by and asked, \"Where did you find {thing}?\"",
        f"\"At {place},\" said {a}. \"The {animal} saw it first.\"",
        f"They played with {thing} until the evening.",
        f"When they went home, {a} was {feel} and {b} was {r.choice(FEELINGS)}.",
    ]
    return " ".join(lines[: r.randint(4, 6)])


def facts(r: random.Random) -> str:
    out = []
    for country in r.sample(sorted(CAPITALS), r.randint(3, 6)):
        out.append(f"The capital of {country} is {CAPITALS[country]}.")
    for thing in r.sample(sorted(COLORS), r.randint(2, 4)):
        out.append(f"The color of the {thing} is {COLORS[thing]}.")
    r.shuffle(out)
    return " ".join(out)


def arithmetic(r: random.Random) -> str:
    out = []
    for _ in range(r.randint(4, 8)):
        x, y = r.randint(0, 20), r.randint(0, 20)
        if r.random() < 0.5:
            out.append(f"{x} plus {y} is {x + y}.")
        else:
            out.append(f"{max(x, y)} minus {min(x, y)} is {max(x, y) - min(x, y)}.")
    return " ".join(out)


def recipe(r: random.Random) -> str:
    food = r.choice(FOODS)
    items = r.sample(INGREDIENTS, r.randint(3, 5))
    steps = [f"How to make {food}.", f"You need {', '.join(items[:-1])} and {items[-1]}."]
    for i, verb in enumerate(r.sample(VERBS, r.randint(3, 4)), 1):
        steps.append(f"Step {i}: {verb} the {r.choice(items)}.")
    steps.append(f"Serve the {food} {r.choice(['hot', 'warm', 'cold'])}.")
    return " ".join(steps)


def weather(r: random.Random) -> str:
    out = []
    for day in DAYS[r.randint(0, 3):][: r.randint(3, 5)]:
        w, t = r.choice(WEATHER), r.randint(-5, 30)
        out.append(f"On {day} it will be {w} with a high of {t} degrees.")
    return "Weather report. " + " ".join(out)


KINDS = [story, story, facts, arithmetic, recipe, weather]


def generate(n_docs: int = 1800, seed: int = 0) -> list[dict[str, str]]:
    r = random.Random(seed)
    docs = []
    for i in range(n_docs):
        kind = KINDS[r.randrange(len(KINDS))]
        docs.append({"id": f"doc-{i:05d}", "kind": kind.__name__, "text": kind(r)})
    return docs


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("tiny-corpus.jsonl")
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1800
    with out.open("w", encoding="utf-8") as f:
        for d in generate(n):
            f.write(json.dumps(d) + "\n")
    print(f"wrote {n} documents, {out.stat().st_size} bytes to {out}")


if __name__ == "__main__":
    main()
