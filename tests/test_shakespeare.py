"""Shakespeare: LEAF's next-character task from a tinyshakespeare-format file, one client per speaking role.

The tests write their own small file in the same format (the real one is never needed)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from maestro_fl.config import ConfigError, SimConfig, resolve
from maestro_fl.data import load_dataset
from maestro_fl.partition import PartitionError, partition_indices
from maestro_fl.shakespeare import SEQUENCE_LENGTH, STRIDE, TRAIN_SHARE, load_shakespeare, speeches_by_role

ROLES = {"KING RICHARD II": 3, "First Citizen": 2, "JULIET": 1}  # role -> how many speeches (text grows with it)


def speech(rng: random.Random, words: int) -> str:
    vocab = ["thou", "art", "my", "lord", "and", "the", "crown", "of", "night", "o", "fair", "love", "is", "dead"]
    lines = [" ".join(rng.choice(vocab) for _ in range(8)).capitalize() + rng.choice([",", ".", "!"])
             for _ in range(words // 8)]
    return "\n".join(lines)


def write_play(path: Path, seed: int = 0) -> dict[str, str]:
    """A small play in the tinyshakespeare format; returns each role's speech as the loader should read it."""
    rng = random.Random(seed)
    order = [role for role, n in ROLES.items() for _ in range(n)]
    rng.shuffle(order)
    blocks, expected = [], {}
    for role in order:
        text = speech(rng, 160)
        blocks.append(f"{role}:\n{text}\n")
        expected[role] = f"{expected[role]}\n{text}" if role in expected else text
    path.write_text("\n".join(blocks))
    return expected


@pytest.fixture
def play(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "play" / "input.txt"
    path.parent.mkdir()
    return path, write_play(path)


def test_each_roles_text_splits_in_order_into_windows_and_their_next_character(play) -> None:  # type: ignore[no-untyped-def]
    path, expected = play
    assert speeches_by_role(path.read_text()) == expected
    task = load_shakespeare(path.parent)  # a folder holding input.txt, or the file itself
    assert task.roles == tuple(expected)
    decode = "".join
    for i, role in enumerate(task.roles):
        text = expected[role]
        cut = int(len(text) * TRAIN_SHARE)
        rows = np.flatnonzero(task.train_roles == i)
        assert len(rows) == len(range(0, cut - SEQUENCE_LENGTH, STRIDE))
        first, last = task.train_x[rows[0]], task.train_x[rows[-1]]
        assert decode(task.vocabulary[c] for c in first) == text[:SEQUENCE_LENGTH]
        assert task.vocabulary[task.train_y[rows[0]]] == text[SEQUENCE_LENGTH]
        end = (len(rows) - 1) * STRIDE + SEQUENCE_LENGTH
        assert end < cut and decode(task.vocabulary[c] for c in last) == text[end - SEQUENCE_LENGTH:end]
    train_text = "".join(t[: int(len(t) * TRAIN_SHARE)] for t in expected.values())
    assert set(task.vocabulary[1:]) == set(train_text)  # the training text's characters, and id 0 for the rest
    data = load_dataset("shakespeare", str(path))
    assert data.spec.shape == (SEQUENCE_LENGTH,) and data.spec.vocab_size == data.spec.num_classes
    assert len(data.test) == len(task.test_y) > 0 and data.groups is not None


@pytest.mark.parametrize(
    "content,message",
    [
        ("", r"data_root: '.*' is empty; expected the tinyshakespeare format"),
        ("Now is the winter of our discontent\nMade glorious summer\n", r"data_root: '.*' has no role lines"),
        ("KING:\nToo short.\n\nQUEEN:\nAlso.\n", r"data_root: '.*': no role has enough text .* 'KING', has 10$"),
    ],
    ids=["empty", "no role lines", "too little text"],
)
def test_a_bad_file_is_one_line_naming_data_root_before_anything_starts(tmp_path: Path, content: str,
                                                                        message: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        resolve(SimConfig, overrides=["dataset=shakespeare", f"data_root={path}", "model=char_transformer"])
    with pytest.raises(ConfigError, match=r"data_root: '.*nowhere' is neither a text file nor a folder"):
        resolve(SimConfig, overrides=["dataset=shakespeare", f"data_root={tmp_path / 'nowhere'}"])


def test_natural_takes_the_largest_roles_when_there_are_fewer_clients_and_refuses_more() -> None:
    groups = np.array([0] * 5 + [1] * 9 + [2] * 2 + [3] * 7)
    labels = np.zeros(len(groups), dtype=np.int64)
    parts = partition_indices(labels, 2, "natural", groups=groups)
    assert sorted(sorted(set(groups[p])) for p in parts) == [[1], [3]]
    assert sorted(len(p) for p in parts) == [7, 9]
    with pytest.raises(PartitionError, match="set num_clients to at most 4"):
        partition_indices(labels, 5, "natural", groups=groups)


def test_partition_natural_needs_no_column_on_shakespeare_and_refuses_one(play) -> None:  # type: ignore[no-untyped-def]
    path, _ = play
    base = ["dataset=shakespeare", f"data_root={path}", "partition=natural"]
    assert resolve(SimConfig, overrides=base).partition_by == ""
    with pytest.raises(ConfigError, match="has its own natural groups"):
        resolve(SimConfig, overrides=[*base, "partition_by=role"])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedlod", "fjord"])
def test_a_federation_of_roles_trains_the_char_transformer_and_reports_every_tier(
    play, tmp_path: Path, strategy: str  # type: ignore[no-untyped-def]
) -> None:
    from strategies.runners.launch import run_simulation

    path, _ = play
    cfg = resolve(SimConfig, overrides=[
        "dataset=shakespeare", f"data_root={path}", "model=char_transformer", "partition=natural", "num_clients=3",
        "clients_per_round=3", "rounds=2", "local_epochs=1", "backend=local", "ignore_budgets=true",
        "tier_shares=0.34,0.33,0.33", f"strategy={strategy}", f"out_dir={tmp_path / 'runs'}", "progress=false"])
    run = run_simulation(cfg)
    tiers = pd.read_csv(run / "tiers.csv")
    last = tiers[tiers["round"] == 2]
    assert len(last) >= 1 and last["accuracy"].between(0, 1).all() and np.isfinite(last["loss"]).all()
    from maestro_fl.results import RunDir, final_columns, format_table

    rows = RunDir(run).final_table()
    assert all(row["perplexity"] == pytest.approx(np.exp(row["loss"])) for row in rows)
    header = format_table(rows, final_columns("shakespeare")).splitlines()[0].split()
    assert header[:4] == ["tier", "accuracy", "loss", "perplexity"]
    assert "perplexity" not in format_table(rows, final_columns("digits"))
    clients = pd.read_csv(run / "clients.csv")  # (selection follows each device's availability)
    assert clients["round"].nunique() == 2 and set(clients["partition_id"]) <= {0, 1, 2}
