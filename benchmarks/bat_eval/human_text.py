"""Human text that installs from a package registry: Debian's `fortunes` package (BSD fortune(6) data).

The .deb is fetched with `apt-get download` (Debian's registry, no root needed beyond apt's lists) and
unpacked into the user cache with `dpkg-deb -x`; nothing is installed system-wide. An installed
/usr/share/games/fortunes is used as it is. Passages are prose fortunes of 40-200 words, split by
words into a prefix and a human continuation, chosen with a fixed seed.
"""

from __future__ import annotations

import glob
import os
import random
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass

from bat_core import BatError

# prose collections (code, ASCII art, poetry and one-liners left out)
COLLECTIONS = (
    "art",
    "cookie",
    "education",
    "food",
    "humorists",
    "kids",
    "law",
    "love",
    "medicine",
    "people",
    "politics",
    "science",
    "sports",
    "tao",
    "wisdom",
    "work",
)
SYSTEM_DIR = "/usr/share/games/fortunes"
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "bat-sampling", "fortunes")
MIN_WORDS, MAX_WORDS = 40, 200


@dataclass(frozen=True)
class Passage:
    id: str  # collection:index in the file
    prefix: str
    continuation: str  # the human continuation (words after the prefix)

    def as_dict(self) -> dict:
        return asdict(self)


def fortunes_dir(fetch: bool = False) -> str:
    """The folder of fortune files: the system's, else the unpacked copy in the user cache (fetched
    with apt-get when `fetch` is true)."""
    for folder in (
        os.environ.get("BAT_FORTUNES_DIR", ""),
        SYSTEM_DIR,
        os.path.join(CACHE_DIR, "usr/share/games/fortunes"),
    ):
        if folder and os.path.isfile(os.path.join(folder, "wisdom")):
            return folder
    if not fetch:
        raise BatError(
            "Debian's fortunes are missing: run scripts/setup.sh (it runs `python -m bat_eval.human_text`), "
            "or set BAT_FORTUNES_DIR to a folder of fortune files"
        )
    return fetch_fortunes()


def fetch_fortunes() -> str:
    """`apt-get download fortunes` and unpack it into CACHE_DIR (no system-wide install)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise BatError("apt-get and dpkg-deb are needed to fetch Debian's fortunes; set BAT_FORTUNES_DIR instead")
    os.makedirs(CACHE_DIR, exist_ok=True)
    for old in glob.glob(os.path.join(CACHE_DIR, "fortunes_*.deb")):
        os.remove(old)
    done = subprocess.run(["apt-get", "download", "fortunes"], cwd=CACHE_DIR, capture_output=True, text=True)
    debs = glob.glob(os.path.join(CACHE_DIR, "fortunes_*.deb"))
    if done.returncode != 0 or not debs:
        raise BatError(f"apt-get download fortunes failed: {done.stderr.strip()[-500:]}")
    subprocess.run(["dpkg-deb", "-x", debs[0], CACHE_DIR], check=True)
    return fortunes_dir()


def clean(text: str) -> str:
    """One fortune as running text: attribution lines ('-- Author') dropped, whitespace collapsed."""
    lines = [line for line in text.splitlines() if not line.strip().startswith("--")]
    return re.sub(r"\s+", " ", " ".join(lines)).strip()


def is_prose(text: str) -> bool:
    words = text.split()
    letters = sum(ch.isalpha() for ch in text)
    return MIN_WORDS <= len(words) <= MAX_WORDS and letters >= 0.7 * len(text.replace(" ", "")) and text.isascii()


def load_passages(count: int, prefix_words: int = 16, continuation_words: int = 48, seed: int = 0) -> list[Passage]:
    """`count` prose fortunes, shuffled with `seed`, each split into a prefix of `prefix_words` words
    and a human continuation of at most `continuation_words` words."""
    folder = fortunes_dir()
    passages = []
    for name in COLLECTIONS:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as handle:
            entries = handle.read().split("\n%\n")
        for index, entry in enumerate(entries):
            text = clean(entry)
            if is_prose(text):
                words = text.split()
                passages.append(
                    Passage(
                        f"{name}:{index}",
                        " ".join(words[:prefix_words]),
                        " ".join(words[prefix_words : prefix_words + continuation_words]),
                    )
                )
    if len(passages) < count:
        raise BatError(f"only {len(passages)} prose fortunes in {folder}, {count} asked for")
    random.Random(seed).shuffle(passages)
    return passages[:count]


if __name__ == "__main__":  # set-up: make the fortunes available (fetch if needed) and say where
    print(fortunes_dir(fetch=True))
