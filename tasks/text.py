"""The ``char_text`` task: next-character prediction on a user's text file, scored in bits per character.

For Penn Treebank characters, point the options at the three files of the usual character-level
release (``ptb.char.train.txt``, ``ptb.char.valid.txt``, ``ptb.char.test.txt``; characters are
separated by spaces and words by ``_`` there, which this task reads as plain characters)::

    task:
      name: char_text
      options: {path: data/ptb.char.train.txt, val_path: data/ptb.char.valid.txt,
                test_path: data/ptb.char.test.txt, seq_len: 100}

With ``path`` alone the file is cut into 90% train, 5% val and 5% test, in that order. The
alphabet is every character of the files; inputs are one-hot ``(seq_len, alphabet)`` windows
that do not overlap, targets the next character at every step. Metric ``bpc`` (lower is
better): the mean cross-entropy in bits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from errors import UserError
from tasks._registry import register_task
from tasks.sequence import SequenceTask, positive_int

__all__ = ["char_text", "char_windows"]


def _read(option: str, path: str) -> str:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"task option {option}: no text file at '{path}'. Set task.options.{option} to a readable text file.")
    return file.read_text(encoding="utf-8")


def char_windows(text: str, alphabet: dict[str, int], seq_len: int) -> TensorDataset:
    """Non-overlapping windows of ``text``: one-hot inputs ``(n, seq_len, len(alphabet))`` and next-character targets ``(n, seq_len)``."""
    codes = torch.tensor([alphabet[c] for c in text], dtype=torch.int64)
    count = (len(codes) - 1) // seq_len
    inputs = codes[: count * seq_len].reshape(count, seq_len)
    targets = codes[1 : count * seq_len + 1].reshape(count, seq_len)
    return TensorDataset(torch.nn.functional.one_hot(inputs, len(alphabet)).float(), targets)


@register_task("char_text", metrics={"bpc": "min", "accuracy": "max"}, kind="sequence_labelling")
def char_text(path: str, val_path: str | None = None, test_path: str | None = None, seq_len: int = 100) -> SequenceTask:
    """Build the character-level task (module docstring) from ``path`` and optional ``val_path``/``test_path``.

    Raises:
        UserError: A file is missing, only one of ``val_path``/``test_path`` is given, or a
            split is shorter than one window of ``seq_len + 1`` characters.
    """
    seq_len = positive_int("seq_len", seq_len)
    if (val_path is None) != (test_path is None):
        raise UserError("task options val_path and test_path go together: give both, or neither to split `path` 90/5/5.")
    text = _read("path", path)
    if val_path is None:
        cut_val, cut_test = int(len(text) * 0.9), int(len(text) * 0.95)
        parts = {"path (train part)": text[:cut_val], "path (val part)": text[cut_val:cut_test], "path (test part)": text[cut_test:]}
    else:
        parts = {"path": text, "val_path": _read("val_path", val_path), "test_path": _read("test_path", test_path)}
    for option, part in parts.items():
        if len(part) < seq_len + 1:
            raise UserError(
                f"task option {option.split()[0]}: the {option} text has {len(part)} characters, fewer than one window of "
                f"seq_len + 1 = {seq_len + 1}. Give a longer file or lower task.options.seq_len."
            )
    alphabet = {c: i for i, c in enumerate(sorted(set("".join(parts.values()))))}
    train_set, val_set, test_set = (char_windows(part, alphabet, seq_len) for part in parts.values())
    return SequenceTask(
        name="char_text",
        num_classes=len(alphabet),
        input_shape=(seq_len, len(alphabet)),
        train_set=train_set,
        val_set=val_set,
        test_set=test_set,
        metrics=("bpc", "accuracy"),
        output="per_step",
    )
