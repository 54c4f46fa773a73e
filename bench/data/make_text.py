"""Writes bench/data/builtin_text.txt: a long, book-like text made by a seeded grammar.

Nothing is downloaded and nothing is copied: chapters of pseudo-English prose about a handful of
recurring characters, places and objects, with dialogue, so that the text has structure at several
scales (words, sentences, recurring names) like the books of the PG19 set, but no real content.
Only printable ASCII and newlines, so every tokenizer (the built-in character-level one included)
covers it. Run ``python -m bench.data.make_text`` to rebuild it; the output is deterministic.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

PEOPLE = ["Ada", "Brom", "Cass", "Dorian", "Elsa", "Fenwick", "Greta", "Hollis", "Ines", "Jasper", "Kestrel",
          "Linnea", "Mabry", "Nox", "Orla", "Pim"]
PLACES = ["the harbour", "the old mill", "the lighthouse", "the market square", "the orchard", "the north road",
          "the library", "the river ford", "the bell tower", "the salt flats", "the quarry", "the inn at Redmere",
          "the glasshouse", "the ferry landing", "the lower town", "the hill farm"]
THINGS = ["a brass key", "a sealed letter", "an old map", "a lantern", "a wooden box", "a silver coin",
          "a torn sail", "a ledger", "a compass", "a bundle of herbs", "a clay jar", "a length of rope",
          "a folded note", "a pocket watch", "a fishing net", "a loaf of bread"]
ADJ = ["quiet", "cold", "bright", "narrow", "restless", "grey", "heavy", "sudden", "patient", "distant", "warm",
       "crooked", "gentle", "stubborn", "pale", "hollow", "careful", "weary", "sharp", "strange"]
WEATHER = ["rain came in from the sea", "the wind turned to the east", "fog settled over the roofs",
           "the sun broke through the clouds", "snow began to fall", "the air grew still and heavy",
           "a storm gathered beyond the hills", "the tide ran out further than anyone remembered"]
VERB_PAST = ["walked", "hurried", "climbed", "wandered", "rode", "returned", "crept", "ran"]
ACTS = ["opened", "studied", "hid", "carried", "mended", "weighed", "wrapped", "examined", "lost", "found"]
FEEL = ["uneasy", "hopeful", "tired", "certain", "afraid", "amused", "curious", "calm", "angry", "relieved"]
SAY = ["said", "asked", "whispered", "replied", "muttered", "called", "answered", "admitted"]
TIME = ["In the morning", "By noon", "Late that evening", "Before dawn", "After supper", "At midnight",
        "Some hours later", "The next day", "When the bells rang", "Long after the others had gone"]
LINES = ["We should not stay here long", "Did you see who left the gate open", "I know where the {thing} is",
         "Nobody goes to {place} after dark", "It was never about the {thing}", "Tell me what {name} said",
         "The road to {place} is longer than it looks", "You worry too much", "Then we wait for the tide",
         "I kept my promise", "Where were you when the lights went out", "Bring {thing} and follow me",
         "This is how it started", "Ask {name}, not me", "We have until the bells ring"]
CONNECT = ["Still,", "Even so,", "For a while", "At last", "Without a word,", "Then", "Meanwhile", "Afterwards"]


class Book:
    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def pick(self, items):
        return self.r.choice(items)

    def fill(self, s: str) -> str:
        return s.format(name=self.pick(PEOPLE), place=self.pick(PLACES), thing=self.pick(THINGS).split(" ", 1)[1])

    def sentence(self, who: str) -> str:
        r = self.r
        kind = r.random()
        if kind < 0.18:
            return f"{self.pick(TIME)}, {self.pick(WEATHER)}."
        if kind < 0.38:
            return f"{who} {self.pick(VERB_PAST)} to {self.pick(PLACES)} with {self.pick(THINGS)}."
        if kind < 0.55:
            return f"{self.pick(CONNECT)} {who} {self.pick(ACTS)} {self.pick(THINGS)} and felt {self.pick(FEEL)}."
        if kind < 0.7:
            other = self.pick([p for p in PEOPLE if p != who])
            return (f"The {self.pick(ADJ)} light at {self.pick(PLACES)} reminded {who} of {other}, "
                    f"who had always been {self.pick(ADJ)} and {self.pick(FEEL)}.")
        if kind < 0.85:
            line = self.fill(self.pick(LINES))
            end = "?" if line.split()[0] in ("Did", "Where") else ","
            verb = self.pick(["asked", "whispered", "called"]) if end == "?" else self.pick([v for v in SAY if v != "asked"])
            return f"\"{line}{end}\" {who} {verb}."
        return (f"There was something {self.pick(ADJ)} about {self.pick(PLACES)} that day, and {who} "
                f"could not say why.")

    def paragraph(self) -> str:
        who = self.pick(PEOPLE)
        n = self.r.randint(3, 8)
        return " ".join(self.sentence(who if self.r.random() < 0.7 else self.pick(PEOPLE)) for _ in range(n))

    def chapter(self, number: int) -> str:
        title = f"Chapter {number}: The {self.pick(ADJ).capitalize()} {self.pick(THINGS).split(' ', 1)[1].title()}"
        paragraphs = [self.paragraph() for _ in range(self.r.randint(12, 24))]
        return title + "\n\n" + "\n\n".join(wrap(p) for p in paragraphs) + "\n"


def wrap(text: str, width: int = 78) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join(lines + [line])


def make(target_bytes: int = 300_000, seed: int = 1) -> str:
    book = Book(seed)
    parts = ["THE TIDE BOOK\n\nA text generated by a seeded grammar for benchmarks; it means nothing.\n"]
    size, number = len(parts[0]), 1
    while size < target_bytes:
        parts.append(book.chapter(number))
        size += len(parts[-1]) + 1
        number += 1
    return "\n".join(parts)


def main(argv=None) -> int:
    out = Path(__file__).resolve().parent / "builtin_text.txt"
    text = make()
    out.write_text(text, encoding="ascii")
    print(f"wrote {out} ({len(text)} characters)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
