"""Bring-your-own haystack and needles for the needle tasks (``niah``, ``passkey``).

* ``haystack=<path>``: a .txt file, or a folder whose .txt files are read in sorted name order,
  joined and cut into sentences (after ., ! or ? followed by white space). A sample's haystack is
  a run of consecutive sentences from a seeded starting sentence (wrapping around at the end).
* ``needles=<path>``: JSONL in Wu et al.'s ``Retrieval_Head`` format, one needle per line with
  ``needle`` (the sentence inserted), ``question`` and ``real_needle`` (what the answer must
  contain). Answers are scored as they score them: ROUGE-1 recall of ``real_needle``, stemmed
  (the ``rouge-score`` package), a continuous score in [0, 1].
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from framework.interfaces import ConfigError

NEEDLE_KEYS = ("needle", "question", "real_needle")


def read_haystack(path: str) -> list[str]:
    """The sentences of a text file or of a folder's .txt files (sorted by name), each ending in a space."""
    location = Path(path).expanduser()
    if location.is_dir():
        files = sorted(location.glob("*.txt"))
        if not files:
            raise ConfigError(f"task.haystack={path!r} is a folder without .txt files")
    elif location.is_file():
        files = [location]
    else:
        raise ConfigError(f"task.haystack={path!r} is neither a built-in haystack (sentences, noise) nor an existing "
                          ".txt file or folder of .txt files")
    text = " ".join(f.read_text(encoding="utf-8") for f in files)
    sentences = [s.strip() + " " for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s.strip()]
    if len(sentences) < 2:
        raise ConfigError(f"task.haystack={path!r} holds {len(sentences)} sentence(s); a haystack needs text to cut")
    return sentences


def read_needles(path: str) -> list[dict[str, str]]:
    """Needles from a JSONL file in Wu et al.'s format (``needle``, ``question``, ``real_needle``)."""
    location = Path(path).expanduser()
    if not location.is_file():
        raise ConfigError(f"task.needles={path!r} is not a file (JSONL lines with {', '.join(NEEDLE_KEYS)})")
    needles = []
    for number, line in enumerate(location.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"task.needles={path!r}, line {number}: not JSON ({error.msg})") from None
        missing = [k for k in NEEDLE_KEYS if not isinstance(record.get(k), str) or not record[k].strip()]
        if missing:
            raise ConfigError(f"task.needles={path!r}, line {number}: needs the text field(s) {', '.join(missing)}")
        needles.append({k: record[k].strip() for k in NEEDLE_KEYS})
    if not needles:
        raise ConfigError(f"task.needles={path!r} holds no needle")
    return needles
