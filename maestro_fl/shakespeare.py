"""Shakespeare: next-character prediction with one client per speaking role (LEAF's task, from a local file).

LEAF (Caldas et al., 2018, arXiv 1812.01097) and the FedAvg paper (McMahan
et al., AISTATS 2017) give each speaking role of the plays to one client: a
federation that is non-IID by nature (a king's speech is not a servant's).
A sample is 80 characters and its label the character that follows.

The text is read from a file in the tinyshakespeare format (Karpathy's
char-rnn): a role's name alone on a line ending in ``:``, then its speech,
then a blank line. ``data_root`` is that file, or a folder holding it as
``input.txt``. This file has no play boundaries, so a role's name is its
client (LEAF splits by play and role).

Each role's speech, in the order of the text, is split by characters: the
first 80% train, the last 20% test, and each part is cut into windows
separately (no window straddles the split). The vocabulary is the set of
characters of the training text, plus one id for a character it lacks.
Deviation from LEAF: windows start every :data:`STRIDE` characters instead
of at every character, which keeps a role's samples from overlapping by 79
of 80 characters and the data at a size two cores train on in minutes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SEQUENCE_LENGTH = 80  # LEAF's and the FedAvg paper's sample: 80 characters, then the label
STRIDE = 40  # a window every 40 characters: consecutive samples share half their text (LEAF: every character)
TRAIN_SHARE = 0.8  # LEAF: the first 80% of a role's text trains, the last 20% tests
MIN_TRAIN_SAMPLES = 8  # a role with fewer training windows is dropped (LEAF drops its small users likewise)
FILE_NAME = "input.txt"  # the name tinyshakespeare's file has in a folder
UNKNOWN = "\x00"  # id 0: a character the training text does not have

_ROLE = re.compile(r"^([A-Za-z][A-Za-z '.,&-]*):\s*$")


class ShakespeareFileError(ValueError):
    """The file at ``data_root`` is not in the tinyshakespeare format, or has too little text."""


@dataclass(frozen=True)
class CharacterTask:
    """Windows and labels per split, each window's role, the vocabulary and the roles' names."""

    train_x: torch.Tensor  # (N, SEQUENCE_LENGTH) character ids
    train_y: torch.Tensor  # (N,) the next character's id
    train_roles: np.ndarray  # (N,) the role index of each training window
    test_x: torch.Tensor
    test_y: torch.Tensor
    vocabulary: str  # the character of each id
    roles: tuple[str, ...]  # the kept roles' names, by index


def source_file(root: str | Path) -> Path:
    """The text file ``data_root`` names: the path itself, or ``input.txt`` inside it."""
    path = Path(root)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise ShakespeareFileError(
            f"data_root: {str(root)!r} is neither a text file nor a folder holding {FILE_NAME!r}; dataset "
            "'shakespeare' reads a file in the tinyshakespeare format (a role's name alone on a line ending "
            "in ':', its speech, a blank line)")
    return path


def speeches_by_role(text: str) -> dict[str, str]:
    """Every role's speech, in the order of the text (a role's speeches joined by a newline)."""
    by_role: dict[str, list[str]] = {}
    role: str | None = None
    lines: list[str] = []
    for line in [*text.splitlines(), ""]:
        match = _ROLE.match(line) if role is None or not lines else None
        if role is None and match is None:
            continue  # text before the first role line, or between speeches: no speaker
        if match is not None and role is None:
            role, lines = match.group(1).strip(), []
            continue
        if line.strip():
            lines.append(line)
            continue
        if role is not None and lines:  # a blank line ends the speech
            by_role.setdefault(role, []).append("\n".join(lines))
        role, lines = None, []
    return {name: "\n".join(parts) for name, parts in by_role.items()}


def windows(ids: np.ndarray, length: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Every ``length``-character window starting at a multiple of ``stride``, and the character after it."""
    starts = np.arange(0, len(ids) - length, stride)
    if not len(starts):
        return np.zeros((0, length), np.int64), np.zeros(0, np.int64)
    x = ids[starts[:, None] + np.arange(length)[None, :]]
    return x.astype(np.int64), ids[starts + length].astype(np.int64)


def load_shakespeare(root: str | Path, length: int = SEQUENCE_LENGTH, stride: int = STRIDE,
                     min_train_samples: int = MIN_TRAIN_SAMPLES) -> CharacterTask:
    """The character task of the file at ``root`` (see the module docstring).

    Raises
    ------
    ShakespeareFileError
        One line naming ``data_root`` and what was expected: no file, an empty
        file, no role lines, or no role with enough text for ``min_train_samples``
        windows of ``length`` characters.
    """
    path = source_file(root)
    text = path.read_text(encoding="utf-8", errors="replace")
    where = f"data_root: {str(path)!r}"
    if not text.strip():
        raise ShakespeareFileError(f"{where} is empty; expected the tinyshakespeare format (a role's name alone on "
                                   "a line ending in ':', its speech, a blank line)")
    speech = speeches_by_role(text)
    if not speech:
        raise ShakespeareFileError(f"{where} has no role lines; expected a role's name alone on a line ending in "
                                   "':' before each speech (the tinyshakespeare format)")
    cut = {role: int(len(s) * TRAIN_SHARE) for role, s in speech.items()}
    need = length + (min_train_samples - 1) * stride + 1  # training characters for min_train_samples windows
    kept = [role for role in speech if cut[role] >= need]
    if not kept:
        longest = max(speech, key=lambda r: len(speech[r]))
        raise ShakespeareFileError(
            f"{where}: no role has enough text for {min_train_samples} training samples of {length} characters "
            f"(a role needs {need / TRAIN_SHARE:.0f} characters, {TRAIN_SHARE:.0%} of them for training); the "
            f"longest, {longest!r}, has {len(speech[longest])}")
    vocabulary = UNKNOWN + "".join(sorted({c for role in kept for c in speech[role][:cut[role]]}))
    index = {c: i for i, c in enumerate(vocabulary)}

    def encode(s: str) -> np.ndarray:
        return np.fromiter((index.get(c, 0) for c in s), dtype=np.int64, count=len(s))

    train_x, train_y, train_roles, test_x, test_y = [], [], [], [], []
    for i, role in enumerate(kept):
        x, y = windows(encode(speech[role][:cut[role]]), length, stride)
        train_x.append(x)
        train_y.append(y)
        train_roles.append(np.full(len(y), i, dtype=np.int64))
        x, y = windows(encode(speech[role][cut[role]:]), length, stride)
        test_x.append(x)
        test_y.append(y)
    return CharacterTask(
        torch.from_numpy(np.concatenate(train_x)), torch.from_numpy(np.concatenate(train_y)),
        np.concatenate(train_roles), torch.from_numpy(np.concatenate(test_x)),
        torch.from_numpy(np.concatenate(test_y)), vocabulary, tuple(kept))
