"""The small demo SFT dataset shipped with the project, generated from a seed (no downloads).

Templated prompt/completion tasks with one fixed, short answer format each, so that a 135M
instruct model measurably learns the formats in a few dozen LoRA steps:

  What is 17 + 25?                      ->  17 + 25 = 42.
  Convert 3 km to meters.               ->  3 km = 3000 m.
  What is the capital of Peru?          ->  The capital of Peru is Lima.
  Reverse the word "lemon".             ->  nomel
  Write "blue sky" in capital letters.  ->  BLUE SKY

A few records are repeated exactly, so data preparation's de-duplication has something to remove.

    python -m steps.demo_data OUT.jsonl [--n 400] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Kenya": "Nairobi",
    "Egypt": "Cairo",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Argentina": "Buenos Aires",
    "Colombia": "Bogota",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Indonesia": "Jakarta",
    "Morocco": "Rabat",
    "Ghana": "Accra",
    "Cuba": "Havana",
    "Nepal": "Kathmandu",
    "Denmark": "Copenhagen",
    "Belgium": "Brussels",
    "Netherlands": "Amsterdam",
    "Turkey": "Ankara",
    "Iceland": "Reykjavik",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "India": "New Delhi",
    "China": "Beijing",
    "Russia": "Moscow",
    "Ukraine": "Kyiv",
}
WORDS = [
    "apple",
    "lemon",
    "river",
    "cloud",
    "tiger",
    "piano",
    "garden",
    "window",
    "candle",
    "forest",
    "planet",
    "rocket",
    "bridge",
    "castle",
    "silver",
    "orange",
    "pencil",
    "butter",
    "summer",
    "winter",
    "yellow",
    "mirror",
    "stone",
    "ocean",
    "music",
    "paper",
    "honey",
    "light",
    "train",
    "horse",
]
UNITS = [  # (from, to, factor)
    ("km", "m", 1000),
    ("m", "cm", 100),
    ("kg", "g", 1000),
    ("L", "mL", 1000),
    ("h", "min", 60),
    ("min", "s", 60),
]
UNIT_NAMES = {
    "km": "km",
    "m": "meters",
    "cm": "centimeters",
    "kg": "kg",
    "g": "grams",
    "L": "liters",
    "mL": "milliliters",
    "h": "hours",
    "min": "minutes",
    "s": "seconds",
}


def _addition(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    prompt = rng.choice(["What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}."]).format(
        a=a, b=b
    )
    return {"prompt": prompt, "completion": f"{a} + {b} = {a + b}."}


def _conversion(rng: random.Random) -> dict[str, str]:
    source, target, factor = rng.choice(UNITS)
    value = rng.randint(2, 20)
    prompt = rng.choice(["Convert {v} {s} to {t}.", "How many {t} are in {v} {s}?"]).format(
        v=value, s=source, t=UNIT_NAMES[target]
    )
    return {"prompt": prompt, "completion": f"{value} {source} = {value * factor} {target}."}


def _capital(rng: random.Random) -> dict[str, str]:
    country = rng.choice(sorted(CAPITALS))
    prompt = rng.choice(["What is the capital of {c}?", "Name the capital city of {c}."]).format(
        c=country
    )
    return {"prompt": prompt, "completion": f"The capital of {country} is {CAPITALS[country]}."}


def _reverse(rng: random.Random) -> dict[str, str]:
    word = rng.choice(WORDS)
    prompt = rng.choice(['Reverse the word "{w}".', 'Spell "{w}" backwards.']).format(w=word)
    return {"prompt": prompt, "completion": word[::-1]}


def _uppercase(rng: random.Random) -> dict[str, str]:
    phrase = f"{rng.choice(WORDS)} {rng.choice(WORDS)}"
    return {"prompt": f'Write "{phrase}" in capital letters.', "completion": phrase.upper()}


TASKS = (_addition, _conversion, _capital, _reverse, _uppercase)


def demo_records(n: int = 400, seed: int = 0, duplicates: int = 8) -> list[dict[str, str]]:
    """`n` prompt/completion records, `duplicates` of them exact repeats of earlier ones."""
    rng = random.Random(seed)
    records: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for i in range(n - duplicates):
        # Draw until the record is new (trying the next task when one runs short of combinations),
        # so the only duplicates are the deliberate ones below.
        for attempt in range(100):
            record = TASKS[(i + attempt // 10) % len(TASKS)](rng)
            if (record["prompt"], record["completion"]) not in seen:
                break
        seen.add((record["prompt"], record["completion"]))
        records.append(record)
    for _ in range(duplicates):
        records.insert(rng.randrange(len(records) + 1), dict(rng.choice(records)))
    return records


def write_demo_dataset(path: Path, n: int = 400, seed: int = 0) -> Path:
    """Write the demo dataset as JSONL to `path` and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in demo_records(n, seed))
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write the demo SFT dataset as JSONL.")
    parser.add_argument("path", type=Path)
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    path = write_demo_dataset(arguments.path, arguments.n, arguments.seed)
    print(f"wrote {arguments.n} records to {path}")
