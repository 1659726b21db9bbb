"""Training data: local JSONL / JSON / CSV / Parquet files loaded with `datasets`, checked
row by row, rendered per format, tokenized with labels only on what the model must learn,
filtered (exact duplicates, over-long examples: counted, never truncated), split, batched.

Formats: `completion` (prompt, completion: loss on the completion and eos), `chat`
(messages rendered with the tokenizer's chat template: loss on assistant turns) and `text`
(loss on every token).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch

from registry.artifacts import sha256_file
from tuning.config import DataConfig
from tuning.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

T = TypeVar("T")

IGNORE = -100  # label of tokens without loss
LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss
    prompt_ids: list[int]  # what a request would send (profile, generation metrics)
    completion: str | None = None  # reference answer (completion format)
    label: str | None = None  # class label (classification)


@dataclass
class DataReport:
    """Counts of every step, so nothing is dropped silently."""

    files: dict[str, str] = field(default_factory=dict)  # path -> sha256
    rows: int = 0
    duplicates: int = 0
    too_long: int = 0
    train: int = 0
    eval: int = 0
    fingerprint: str = ""


def _row_locations(path: Path, count: int) -> list[str]:
    """Human locations of the rows datasets returns: JSONL lines skip blank ones."""
    if path.suffix == ".jsonl":
        lines = [i + 1 for i, line in enumerate(path.read_text().splitlines()) if line.strip()]
        return [f"{path}:{n}" for n in lines[:count]]
    if path.suffix == ".csv":
        return [f"{path}:{i + 2}" for i in range(count)]  # line 1 is the header
    return [f"{path} row {i + 1}" for i in range(count)]


def _load_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    loader = LOADERS.get(path.suffix)
    if loader is None:
        raise DataError(
            f"{path}: unknown file type {path.suffix!r}; use .jsonl, .json, .csv or .parquet"
        )
    try:
        dataset = load_dataset(loader, data_files=str(path), split="train")
    except (DatasetGenerationError, ValueError, OSError) as err:
        if path.suffix == ".jsonl":
            _scan_jsonl(path)
        raise DataError(f"{path}: cannot be read as {loader}: {err}") from err
    rows = [dict(r) for r in dataset]
    return list(zip(_row_locations(path, len(rows)), rows, strict=True))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of one data file as loaded for training (no checks, no tokenization)."""
    return [row for _, row in _load_rows(path)]


def _scan_jsonl(path: Path) -> None:
    """Find the line that broke loading: invalid JSON or a field whose type changes."""
    types: dict[str, tuple[str, int]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{n}: invalid JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        for key, value in row.items():
            kind = type(value).__name__
            seen = types.setdefault(key, (kind, n))
            if seen[0] != kind and value is not None:
                raise DataError(
                    f"{path}:{n}: field {key!r} is {kind} but was {seen[0]} on line {seen[1]}"
                )


def _require(location: str, row: dict[str, Any], name: str, kind: type[T]) -> T:
    value = row.get(name)
    if value is None:
        raise DataError(f"{location}: missing field {name!r} (fields: {', '.join(sorted(row))})")
    if not isinstance(value, kind):
        raise DataError(
            f"{location}: field {name!r} must be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _check_row(location: str, row: dict[str, Any], fmt: str) -> None:
    if fmt == "completion":
        _require(location, row, "prompt", str)
        if not _require(location, row, "completion", str).strip():
            raise DataError(f"{location}: field 'completion' is empty")
    elif fmt == "text":
        _require(location, row, "text", str)
    elif fmt == "classification":
        if not _require(location, row, "text", str).strip():
            raise DataError(f"{location}: field 'text' is empty")
        label = row.get("label")
        if label is None:
            raise DataError(f"{location}: missing field 'label' (fields: {', '.join(sorted(row))})")
        if isinstance(label, bool) or not isinstance(label, str | int):
            raise DataError(
                f"{location}: field 'label' must be a string or an integer, got "
                f"{type(label).__name__}"
            )
    else:
        messages = _require(location, row, "messages", list)
        for i, message in enumerate(messages):
            where = f"{location}: messages[{i}]"
            if not isinstance(message, dict):
                raise DataError(f"{where} must be an object with role and content")
            role = _require(where, message, "role", str)
            _require(where, message, "content", str)
            if role not in ROLES:
                raise DataError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{location}: messages has no assistant turn to learn from")


def tokenize(row: dict[str, Any], fmt: str, tokenizer: PreTrainedTokenizerBase) -> Example:
    """One row -> input ids with labels (IGNORE outside the learned part)."""
    eos = tokenizer.eos_token_id
    if fmt == "completion":
        prompt = tokenizer(row["prompt"])["input_ids"]
        answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [eos]
        return Example(prompt + answer, [IGNORE] * len(prompt) + answer, prompt, row["completion"])
    if fmt == "text":
        ids = tokenizer(row["text"])["input_ids"] + [eos]
        return Example(ids, list(ids), ids)
    if fmt == "classification":  # no eos: the head reads the last token that is not padding
        ids = tokenizer(row["text"])["input_ids"]
        return Example(ids, [], ids, label=str(row["label"]))
    return _tokenize_chat(row["messages"], tokenizer)


def _tokenize_chat(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> Example:
    """Render turn by turn: text before each assistant turn is context, the turn is learned."""
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    prompt_ids: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # With tokenize=False it returns the rendered str; the annotation is every return type.
        prefix = cast(
            str,
            tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True),
        )
        full = cast(str, tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
        if not prefix.startswith(rendered) or not full.startswith(prefix):
            raise DataError(
                "the tokenizer's chat template does not render turns incrementally, so "
                "assistant tokens cannot be separated; use format: completion"
            )
        context = tokenizer(prefix[len(rendered) :], add_special_tokens=not ids)["input_ids"]
        answer = tokenizer(full[len(prefix) :], add_special_tokens=False)["input_ids"]
        ids += context
        labels += [IGNORE] * len(context)
        prompt_ids = list(ids)
        ids += answer
        labels += answer
        rendered = full
    return Example(ids, labels, prompt_ids)


def _fingerprint(examples: Sequence[Example]) -> str:
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.input_ids, ex.labels]).encode())
    return digest.hexdigest()


def load_tokenizer(base: Path) -> PreTrainedTokenizerBase:
    """The base's tokenizer as a tuning run uses it (pad = eos where it has no pad)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _read_examples(
    paths: list[Path],
    config: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    report: DataReport,
    fmt: str,
) -> list[Example]:
    """Read, check, dedupe, tokenize and filter the rows of `paths`, counting in `report`."""
    seen: set[str] = set()
    out: list[Example] = []
    for path in paths:
        report.files[str(path)] = sha256_file(path)
        for location, row in _load_rows(path):
            report.rows += 1
            _check_row(location, row, fmt)
            key = json.dumps(row, sort_keys=True, default=str)
            if config.dedupe and key in seen:
                report.duplicates += 1
                continue
            seen.add(key)
            example = tokenize(row, fmt, tokenizer)
            if len(example.input_ids) > config.max_length:
                report.too_long += 1
                continue
            out.append(example)
    return out


def row_format(config: DataConfig, task: str) -> str:
    """How rows are read: data.format, or `text` + `label` columns for classification."""
    return "classification" if task == "classification" else config.format


def load_eval_examples(
    config: DataConfig, tokenizer: PreTrainedTokenizerBase, task: str = "generation"
) -> list[Example]:
    """The examples of `config.eval` alone, read as `load_examples` reads them (the training
    files are not read)."""
    if not config.eval:
        raise DataError("data.eval names no file; this needs explicit eval files")
    return _read_examples(config.eval, config, tokenizer, DataReport(), row_format(config, task))


def load_examples(
    config: DataConfig, tokenizer: PreTrainedTokenizerBase, task: str = "generation"
) -> tuple[list[Example], list[Example], DataReport]:
    """Read, check, tokenize, filter and split; return train, eval and the report."""
    report = DataReport()

    def read(paths: list[Path]) -> list[Example]:
        return _read_examples(paths, config, tokenizer, report, row_format(config, task))

    train = read(config.train)
    if config.eval:
        held_out = read(config.eval)
    else:
        order = list(range(len(train)))
        random.Random(config.split_seed).shuffle(order)
        n_eval = max(1, round(len(train) * config.eval_fraction))
        held_out = [train[i] for i in sorted(order[:n_eval])]
        train = [train[i] for i in sorted(order[n_eval:])]
    if not train or not held_out:
        raise DataError(
            f"no examples left to {'train on' if not train else 'evaluate'}: {report.rows} rows, "
            f"{report.duplicates} duplicates, {report.too_long} longer than max_length "
            f"{config.max_length}; raise data.max_length or add data"
        )
    report.train, report.eval = len(train), len(held_out)
    report.fingerprint = _fingerprint(train)
    return train, held_out, report


def pad_batch(
    examples: Sequence[Example], pad_id: int, classes: dict[str, int] | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded batch with an attention mask; with `classes` (label -> index), the
    labels are each example's class index."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        if ex.labels:  # a classification row has none
            labels[row, :n] = torch.tensor(ex.labels)
        mask[row, :n] = 1
    if classes is not None:
        labels = torch.tensor([classes[str(e.label)] for e in examples], dtype=torch.long)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pack_batch(rows: Sequence[Sequence[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of several examples each; position ids restart at every example, which the
    model turns into a block-diagonal mask (no attention across examples). The first token
    of each example gets no label: nothing before it in its own example predicts it."""
    flat = [[t for e in row for t in e.input_ids] for row in rows]
    width = max(len(f) for f in flat)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for ex in row:
            n = len(ex.input_ids)
            ids[r, start : start + n] = torch.tensor(ex.input_ids)
            labels[r, start + 1 : start + n] = torch.tensor(ex.labels[1:])
            positions[r, start : start + n] = torch.arange(n)
            start += n
        positions[r, start:] = torch.arange(width - start)  # padding: its own segment
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def batches(
    examples: Sequence[Example],
    *,
    batch_size: int,
    max_length: int,
    packing: bool,
    pad_id: int,
    seed: int,
    epoch: int,
    replay: Sequence[Example] = (),
    replay_rows: int = 0,
    classes: dict[str, int] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """The micro-batches of one epoch, in an order fixed by (seed, epoch). With replay,
    each batch is batch_size - replay_rows rows of the task and replay_rows windows of
    `replay` (drawn in a shuffled order, reshuffled at every pass), so an epoch is still
    one pass over the task."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = [examples[i] for i in torch.randperm(len(examples), generator=generator).tolist()]
    rows: list[list[Example]] = [[ex] for ex in order]
    if packing:
        rows, used = [[]], 0
        for ex in order:
            if used + len(ex.input_ids) > max_length and rows[-1]:
                rows.append([])
                used = 0
            rows[-1].append(ex)
            used += len(ex.input_ids)
    task_rows = batch_size - replay_rows if replay else batch_size
    drawn = _cycle(replay, random.Random(seed * 100_003 + epoch))
    out = []
    for i in range(0, len(rows), task_rows):
        group = rows[i : i + task_rows]
        if replay:
            group += [[next(drawn)] for _ in range(replay_rows)]
        if packing:
            out.append(pack_batch(group, pad_id))
        else:
            out.append(pad_batch([r[0] for r in group], pad_id, classes))
    return out


def _cycle(items: Sequence[Example], rng: random.Random) -> Iterator[Example]:
    """`items` in shuffled passes without end (nothing when there are none)."""
    while items:
        order = list(items)
        rng.shuffle(order)
        yield from order


def chunks(items: Sequence[Example], size: int) -> Iterator[Sequence[Example]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
