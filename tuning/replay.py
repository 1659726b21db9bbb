"""Replay against forgetting: a share of every training batch is general text, so the
adapter keeps seeing what the base was trained on while it learns the task.

The text comes from `data.replay_text`, by default from the forgetting check's own source
(`data.reference_text`, or the text the project generates). The two never share a window:
generated text is drawn under another seed, and a shared file is split window by window,
the even ones checked and the odd ones replayed, so the forgetting check still measures
text the adapter has not trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tuning.config import DataConfig
from tuning.corpus import paragraphs
from tuning.data import Example
from tuning.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

REFERENCE_SEED = 12345  # generated reference text differs from the tokenizer's corpus
REPLAY_SEED = 54321  # and the replayed text from both
REPLAY_PARAGRAPHS = 256


def text_windows(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], window: int
) -> list[Example]:
    """Paragraphs tokenized end to end and cut into windows of at most `window` tokens
    (nothing dropped), each learned on every token."""
    ids = [t for text in texts if text.strip() for t in tokenizer(text.strip())["input_ids"]]
    return [
        Example(ids[i : i + window], ids[i : i + window], [])
        for i in range(0, len(ids), window)
        if len(ids[i : i + window]) > 1
    ]


def _window(data: DataConfig) -> int:
    return min(data.max_length, 256)


def _shares_file(data: DataConfig) -> bool:
    """Replay on and drawing from the forgetting check's own file."""
    return (
        data.replay > 0
        and data.reference_text is not None
        and data.replay_text in (None, data.reference_text)
    )


def reference_set(tokenizer: PreTrainedTokenizerBase, data: DataConfig) -> list[Example]:
    """The forgetting check's general text: `data.reference_text` (default: generated
    text) in windows of min(max_length, 256) tokens; with replay from the same file, its
    even windows."""
    if data.reference_text is None:
        texts = paragraphs(48, seed=REFERENCE_SEED)
    else:
        texts = data.reference_text.read_text().split("\n\n")
    windows = text_windows(tokenizer, texts, _window(data))
    return windows[0::2] if _shares_file(data) else windows


def replay_set(tokenizer: PreTrainedTokenizerBase, data: DataConfig) -> list[Example]:
    """The windows replayed during training (empty when data.replay is 0)."""
    if data.replay == 0:
        return []
    if _shares_file(data):
        assert data.reference_text is not None
        texts = data.reference_text.read_text().split("\n\n")
        windows = text_windows(tokenizer, texts, _window(data))[1::2]
        where = f"the odd windows of {data.reference_text}"
    elif data.replay_text is not None:
        texts = data.replay_text.read_text().split("\n\n")
        windows = text_windows(tokenizer, texts, _window(data))
        where = str(data.replay_text)
    else:
        windows = text_windows(
            tokenizer, paragraphs(REPLAY_PARAGRAPHS, seed=REPLAY_SEED), _window(data)
        )
        where = "the generated text"
    if not windows:
        raise ConfigError(
            f"data.replay: {where} has no text to replay; give data.replay_text a file of "
            "paragraphs separated by blank lines"
        )
    return windows


def replay_rows(data: DataConfig, batch_size: int) -> int:
    """Rows of every micro-batch drawn from the replay text: round(replay x batch_size)
    (the config admits only shares that leave 1 to batch_size - 1)."""
    return round(data.replay * batch_size)
