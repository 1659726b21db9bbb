"""Data: every format and file type, masking on labels, filters with counts, bad rows
named by file, line and field, packing without attention across examples."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuning.config import DataConfig
from tuning.data import IGNORE, Example, load_examples, pack_batch, pad_batch
from tuning.errors import DataError
from tuning.train import check_packing


@pytest.fixture(scope="module")
def tokenizer(tiny_base: Path) -> object:
    return AutoTokenizer.from_pretrained(str(tiny_base))


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


COMPLETION = [{"prompt": f"Add: {i} + 1 =", "completion": f" {i + 1}"} for i in range(20)]


def test_completion_labels_cover_only_the_completion_and_eos(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = write_jsonl(tmp_path / "c.jsonl", COMPLETION)
    train, held_out, report = load_examples(DataConfig(train=[path], eval_fraction=0.25), tokenizer)
    assert (report.rows, report.train, report.eval) == (20, 15, 5)
    for ex in train + held_out:
        n = len(ex.prompt_ids)
        assert ex.labels[:n] == [IGNORE] * n
        assert ex.labels[n:] == ex.input_ids[n:]
        assert ex.input_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ex.input_ids[n:-1]) == ex.completion


def test_chat_labels_cover_only_assistant_turns(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Say {i}."},
                {"role": "assistant", "content": f"{i}"},
                {"role": "user", "content": "Again."},
                {"role": "assistant", "content": f"{i} again"},
            ]
        }
        for i in range(10)
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    train, _, _ = load_examples(DataConfig(train=[path], format="chat"), tokenizer)
    ex = train[0]
    learned = tokenizer.decode(
        [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE]
    )
    i = learned.split("<|im_end|>")[0]
    assert learned == f"{i}<|im_end|>\n{i} again<|im_end|>\n"
    full = tokenizer.apply_chat_template(rows[int(i)]["messages"], tokenize=False)
    assert tokenizer.decode(ex.input_ids) == full
    assert tokenizer.decode(ex.prompt_ids).endswith("Again.<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_text_format_from_every_file_type(tokenizer, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    rows = pd.DataFrame({"text": [f"The team checks {i} reports." for i in range(12)]})
    path = tmp_path / f"t.{kind}"
    if kind == "jsonl":
        write_jsonl(path, rows.to_dict("records"))
    elif kind == "csv":
        rows.to_csv(path, index=False)
    else:
        rows.to_parquet(path)
    train, _, report = load_examples(DataConfig(train=[path], format="text"), tokenizer)
    assert report.train + report.eval == 12
    assert all(ex.labels == ex.input_ids for ex in train)


def test_duplicates_and_long_examples_are_dropped_and_counted(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rows = COMPLETION + COMPLETION[:3] + [{"prompt": "x " * 200, "completion": " y"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    train, held_out, report = load_examples(DataConfig(train=[path], max_length=32), tokenizer)
    assert (report.rows, report.duplicates, report.too_long) == (24, 3, 1)
    assert report.train + report.eval == 20
    assert all(len(ex.input_ids) <= 32 for ex in train + held_out)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"prompt": "a", "completion": " b"}\n\n{"prompt": "c"}\n',
            "c.jsonl:3: missing field 'completion'",
        ),
        (
            '{"prompt": "a", "completion": " b"}\n{"prompt": 5, "completion": " d"}\n',
            "c.jsonl:2: field 'prompt' must be str, got int",
        ),
        (
            '{"prompt": "a", "completion": " b"}\n{"prompt": ["a"], "completion": " d"}\n',
            "c.jsonl:2: field 'prompt' must be str, got list",
        ),
        ('{"prompt": "a", "completion": " b"}\n{"prompt": "a", \n', "c.jsonl:2: invalid JSON"),
        ('{"prompt": "a", "completion": ""}\n', "c.jsonl:1: field 'completion' is empty"),
    ],
)
def test_bad_rows_name_file_line_and_field(
    tokenizer, tmp_path: Path, content: str, message: str
) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "c.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message.replace(".", r"\.")):
        load_examples(DataConfig(train=[path]), tokenizer)


def test_bad_csv_row_and_chat_role(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    csv = tmp_path / "c.csv"
    csv.write_text("prompt,completion\na,b\nc,\n")
    with pytest.raises(DataError, match=r"c\.csv:3: missing field 'completion'"):
        load_examples(DataConfig(train=[csv]), tokenizer)
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"chat\.jsonl:1: messages\[0\]: role 'robot'"):
        load_examples(DataConfig(train=[chat], format="chat"), tokenizer)


def test_packed_batch_matches_separate_examples(tiny_base: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    check_packing(model, pad_id=0)  # raises if attention crossed examples
    a = Example([5, 6, 7, 8, 9], [IGNORE, IGNORE, 7, 8, 9], [5, 6])
    b = Example([10, 11, 12], [10, 11, 12], [10])
    batch = pack_batch([[a, b]], pad_id=0)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert batch["labels"][0].tolist() == [IGNORE, IGNORE, 7, 8, 9, IGNORE, 11, 12]
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        alone = [model(input_ids=pad_batch([e], 0)["input_ids"]).logits[0] for e in (a, b)]
    torch.testing.assert_close(packed[0], torch.cat(alone), atol=1e-5, rtol=1e-4)
