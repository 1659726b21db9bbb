"""Classification adapters: the example beats both baselines, the saved adapter is what
transformers + peft load, and the registry holds a head to its labels and the base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from registry import Registry
from registry.errors import AdapterConfigError, AdapterWeightsError
from tuning.classify import scores
from tuning.config import load_config
from tuning.errors import DataError
from tuning.train import RunResult, run

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def classifier(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    """examples/sentiment-classifier.yaml trained on the session's tiny base (the config's
    own base is the tiny base of seed 0, which this is)."""
    out = tmp_path_factory.mktemp("classifier")
    config = load_config(
        EXAMPLES / "sentiment-classifier.yaml", [f"base={tiny_base}", f"output.dir={out}"]
    )
    return run(config, source="examples/sentiment-classifier.yaml")


def test_the_example_beats_the_majority_class_and_reports_the_probe(classifier: RunResult) -> None:
    metrics = classifier.metadata.metrics
    majority = metrics["baselines"]["majority"]
    probe = metrics["baselines"]["linear_probe"]
    assert metrics["accuracy"] >= 0.95 and majority["accuracy"] <= 0.6, metrics
    assert metrics["macro_f1"] >= 0.95 and 0 < probe["accuracy"] <= 1
    assert set(probe) >= {"accuracy", "macro_f1", "confusion"}
    assert classifier.metadata.labels == ["negative", "positive"]
    matrix = metrics["confusion"]["matrix"]
    assert sum(map(sum, matrix)) == metrics["examples"] == 200
    assert metrics["label_counts"].keys() == {"negative", "positive"}
    for name in ("loss.png", "confusion.png"):
        assert (classifier.adapter_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_adapter_loads_in_transformers_and_peft(
    classifier: RunResult, tiny_base: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    labels = classifier.metadata.labels
    assert labels is not None
    model = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_base), num_labels=len(labels), pad_token_id=tokenizer.pad_token_id
    )
    model = PeftModel.from_pretrained(model, str(classifier.adapter_dir)).eval()
    rows = [json.loads(line) for line in (EXAMPLES / "data/sentiment-classes/eval.jsonl").open()]
    with torch.no_grad():
        logits = torch.cat(
            [model(**tokenizer(row["text"], return_tensors="pt")).logits for row in rows[:40]]
        )
    predicted = [labels[i] for i in logits.argmax(-1).tolist()]
    right = sum(p == row["label"] for p, row in zip(predicted, rows[:40], strict=True))
    assert right >= 38, predicted


def test_registry_checks_the_head_against_labels_and_base(
    classifier: RunResult, home: Path, tmp_path: Path
) -> None:
    registry = Registry(home)
    record = registry.register("sentiment-classifier", classifier.adapter_dir)
    assert "classifier" in record.features and record.engines == ["hf"]
    assert record.metadata["labels"] == ["negative", "positive"]
    copy = tmp_path / "copy"
    shutil.copytree(classifier.adapter_dir, copy)
    meta = json.loads((copy / "lorafleet.json").read_text())
    (copy / "lorafleet.json").write_text(json.dumps({**meta, "labels": ["a", "b", "c"]}))
    with pytest.raises(
        AdapterWeightsError, match=r"shape \[2, 128\] but 3 labels .* need \[3, 128\]"
    ):
        registry.register("other", copy)
    (copy / "lorafleet.json").write_text(json.dumps({**meta, "labels": None}))
    with pytest.raises(AdapterConfigError, match="has no labels"):
        registry.register("other", copy)
    assert registry.adapter_names() == ["sentiment-classifier"]
    from tuning.retrain import RetrainError, prepare

    with pytest.raises(RetrainError, match="is a classifier; retraining jobs rebuild generation"):
        prepare(registry, record, registry.settings("sentiment-classifier"), 1)


def test_labels_outside_the_set_and_metric_definitions(tiny_base: Path, tmp_path: Path) -> None:
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text(
        "".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(8))
    )
    held_out.write_text(json.dumps({"text": "x", "label": 7}) + "\n")
    config = load_config(
        None,
        [
            f"base={tiny_base}",
            "task=classification",
            f"data.train=[{train}]",
            f"data.eval=[{held_out}]",
            f"output.dir={tmp_path / 'run'}",
        ],
    )
    with pytest.raises(
        DataError, match=r"eval data has label\(s\) '7' outside the label set \['0', '1'\]"
    ):
        run(config)
    # Macro-F1 averages the labels' F1: 1.0 for "a", 0.5 for "b" and for "c".
    got = scores([0, 1, 2, 2, 1], [0, 1, 2, 1, 2], ["a", "b", "c"])
    assert got["accuracy"] == pytest.approx(0.6)
    assert got["macro_f1"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert got["confusion"]["matrix"] == [[1, 0, 0], [0, 1, 1], [0, 1, 1]]


def test_class_weights_weigh_the_loss(tiny_base: Path, tmp_path: Path) -> None:
    from tuning.classify import ClassObjective, class_weights
    from tuning.data import Example

    train = [Example([1, 2], [], [1, 2], label=label) for label in "aaaaaabb"]
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"text": "x", "label": "a"}) + "\n")
    base = [f"base={tiny_base}", "task=classification", f"data.train=[{data}]", "output.dir=x"]
    balanced = load_config(None, [*base, "training.class_weights=balanced"])
    weights = class_weights(balanced, train, ["a", "b"])
    assert weights is not None and weights.tolist() == pytest.approx([8 / 12, 8 / 4])
    given = load_config(None, [*base, "training.class_weights={a: 1, b: 5}"])
    assert class_weights(given, train, ["a", "b"]).tolist() == [1.0, 5.0]  # type: ignore[union-attr]
    assert class_weights(load_config(None, base), train, ["a", "b"]) is None

    class Logits:  # a model whose head says the same for every row
        def __call__(self, **_: object) -> object:
            return type("Out", (), {"logits": torch.tensor([[2.0, 0.0], [2.0, 0.0]])})()

    batch = {"input_ids": torch.ones(2, 2, dtype=torch.long), "attention_mask": torch.ones(2, 2)}
    batch["labels"] = torch.tensor([0, 1])
    plain = ClassObjective({"a": 0, "b": 1}).loss(Logits(), batch)
    weighted = ClassObjective({"a": 0, "b": 1}, weights).loss(Logits(), batch)
    wrong, right = -torch.tensor([2.0, 0.0]).log_softmax(-1)[[1, 0]]
    assert plain.item() == pytest.approx((wrong + right).item() / 2)
    assert weighted.item() == pytest.approx(((8 / 12) * right + 2 * wrong).item() / (8 / 12 + 2))
