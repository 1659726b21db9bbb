"""Classifiers served at /v1/classify: probabilities equal transformers + peft's
AutoModelForSequenceClassification with the adapter (fp32, within 1e-5), in one pass that
mixes two classifiers and a generation request; vLLM's response shape; the refusals; the
true label as feedback; the predicted-label drift signal and the metrics."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import torch

from registry import Registry
from tuning.config import load_config
from tuning.train import run

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TEXTS = [
    "the pizza was great and the staff was friendly.",
    "the room was dirty and the coffee was stale.",
    "we talked about the goal, the coach and the team.",
    "the song, the piano and the band.",
    "the battery was broken and the music was noisy.",
]


@pytest.fixture(scope="module")
def classifiers(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two classifiers trained here: sentiment (2 labels, the example) and topic (4 labels,
    the topic example's rows as text + label, with a head bias-free as transformers makes it)."""
    root = tmp_path_factory.mktemp("classifiers")
    topic = root / "topic.jsonl"
    rows = [json.loads(line) for line in (EXAMPLES / "data/topic/train.jsonl").open()]
    topic.write_text(
        "".join(
            json.dumps(
                {"text": r["prompt"].removesuffix("\nTopic:"), "label": r["completion"].strip()}
            )
            + "\n"
            for r in rows[:400]
        )
    )
    out = {}
    for name, config in (
        (
            "senti",
            [
                f"data.train=[{EXAMPLES / 'data/sentiment-classes/train.jsonl'}]",
                "training.max_steps=60",
            ],
        ),
        ("topic", [f"data.train=[{topic}]", "data.eval=[]", "training.max_steps=60", "method.r=8"]),
    ):
        loaded = load_config(
            EXAMPLES / "sentiment-classifier.yaml",
            [f"base={tiny_base}", f"output.dir={root / name}", "evaluation.batch_size=64", *config],
        )
        out[name] = run(loaded).adapter_dir
    return out


def reference_probs(base: Path, adapter: Path, texts: list[str]) -> list[list[float]]:
    """transformers + peft, one text at a time, fp32."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    labels = json.loads((adapter / "lorafleet.json").read_text())["labels"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base), num_labels=len(labels), pad_token_id=pad
    )
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        return [
            model(**tokenizer(t, return_tensors="pt")).logits[0].softmax(-1).tolist() for t in texts
        ]


@pytest.fixture(scope="module")
def references(tiny_base: Path, classifiers: dict[str, Path]) -> dict[str, list[list[float]]]:
    return {name: reference_probs(tiny_base, path, TEXTS) for name, path in classifiers.items()}


def test_engine_mixes_classifiers_and_generation_in_one_pass(
    tiny_base: Path,
    classifiers: dict[str, Path],
    references: dict[str, list[list[float]]],
    adapter_factory: Callable[..., Path],
) -> None:
    from transformers import AutoTokenizer

    from serving.engines.hf import HFEngine
    from serving.engines.seam import ClassifyRequest, GenerationRequest, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    engine = HFEngine(tiny_base, max_batch=16, max_len=128, adapter_slots=4, max_rank=16)
    try:
        for name, path in classifiers.items():
            engine.load_adapter(f"{name}@1", path)
        engine.load_adapter("gen@1", adapter_factory(tiny_base, rank=4, seed=5))
        gate, blocked = threading.Event(), threading.Event()

        def hold() -> None:
            blocked.set()
            gate.wait(30)

        holder = threading.Thread(target=lambda: engine._call(hold))
        holder.start()
        assert blocked.wait(30)  # the engine thread waits: everything below queues
        results: dict[tuple[str, int], Any] = {}
        done = threading.Event()
        tokens: list[int | None] = []
        engine.submit(
            GenerationRequest(
                "g",
                tokenizer("Review: the pizza")["input_ids"],
                SamplingParams(max_new_tokens=3),
                "gen@1",
            ),
            lambda event: (tokens.append(event.token_id), event.token_id is None and done.set()),
        )
        for i, text in enumerate(TEXTS):
            for name in classifiers:
                ids = tokenizer(text)["input_ids"]

                def keep(result: Any, key: tuple[str, int] = (name, i)) -> None:
                    results[key] = result

                engine.classify(ClassifyRequest(f"{name}{i}", ids, f"{name}@1"), keep)
        gate.set()
        holder.join(30)
        assert done.wait(30) and len(tokens) == 4  # three tokens, then the end
        assert engine._classes.largest_pass == 2 * len(TEXTS)  # both classifiers, one pass
        for (name, i), result in results.items():
            assert result.error is None
            probs = torch.tensor(result.logits).softmax(-1)
            assert torch.allclose(probs, torch.tensor(references[name][i]), atol=1e-5), (name, i)
        assert len(results) == 2 * len(TEXTS)
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def fleet(
    tiny_base: Path,
    classifiers: dict[str, Path],
    adapter_factory: Callable[..., Path],
    serve_in_process: Callable[..., AbstractContextManager[Any]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Any]:
    home = tmp_path_factory.mktemp("classify-home")
    registry = Registry.create(home, tiny_base, max_rank=16)
    for name, path in {**classifiers, "gen": adapter_factory(tiny_base, rank=4, seed=5)}.items():
        registry.register(name, path)
        registry.promote(name, 1)
    registry.close()
    with serve_in_process(
        home, tiny_base, classifiers, drift_min_samples=10, max_len=256, canary_verdicts=False
    ) as service:
        yield service


def test_classify_answers_as_vllm_does_with_the_reference_probabilities(
    fleet: Any, references: dict[str, list[list[float]]]
) -> None:
    for path, name in (("/v1/classify", "senti"), ("/classify", "topic")):
        response = fleet.http.post(path, json={"model": name, "input": TEXTS})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "list" and body["id"].startswith("classify-")
        assert (
            body["model"] == name and response.headers["X-Lorafleet-Adapter-Version"] == f"{name}@1"
        )
        usage = body["usage"]
        assert (
            usage["completion_tokens"] == 0 and usage["prompt_tokens"] == usage["total_tokens"] > 0
        )
        labels = json.loads((fleet.adapters[name] / "lorafleet.json").read_text())["labels"]
        for i, item in enumerate(body["data"]):
            assert item["index"] == i and item["num_classes"] == len(labels)
            assert item["probs"] == pytest.approx(references[name][i], abs=1e-5)
            assert item["label"] == labels[max(range(len(labels)), key=item["probs"].__getitem__)]
    one = fleet.http.post("/v1/classify", json={"model": "senti:production", "input": TEXTS[0]})
    assert one.json()["data"][0]["probs"] == pytest.approx(references["senti"][0], abs=1e-5)
    raw = fleet.http.post(
        "/v1/classify", json={"model": "senti", "input": TEXTS[0], "use_activation": False}
    )
    logits = torch.tensor(raw.json()["data"][0]["probs"])
    assert logits.softmax(-1).tolist() == pytest.approx(references["senti"][0], abs=1e-5)


def test_refusals_name_the_model_and_the_fix(fleet: Any) -> None:
    cases = [
        ({"model": "base", "input": "x"}, 400, "model 'base' has no classification head"),
        ({"model": "gen", "input": "x"}, 400, "gen@1 is a generation adapter"),
        ({"model": "nope", "input": "x"}, 404, "nope"),
        ({"model": "senti", "input": []}, 422, "input is empty"),
        ({"model": "senti", "input": [[99999]]}, 400, "token id 99999 is outside"),
        ({"model": "senti", "input": "x", "n": 2}, 422, "n"),
    ]
    for body, status, text in cases:
        response = fleet.http.post("/v1/classify", json=body)
        assert response.status_code == status and text in response.text, (body, response.text)
    generation = fleet.http.post(
        "/v1/completions", json={"model": "senti", "prompt": "x", "max_tokens": 2}
    )
    assert generation.status_code == 400 and "send its texts to /v1/classify" in generation.text
    assert fleet.served("gen")[0] == "gen@1"  # generation adapters still generate


def test_vllm_engine_refuses_classifiers(fleet: Any) -> None:
    from serving.errors import NotServable
    from serving.runtime.residency import Residency
    from serving.runtime.routing import Target

    record = fleet.server.registry.get_version("senti", 1)
    assert record.unservable["vllm"] == "the vllm engine does not serve classification adapters"
    residency = Residency(fleet.server.engine, "vllm", fleet.server.registry)
    with pytest.raises(
        NotServable, match="senti@1 cannot be served: the vllm engine does not serve"
    ):
        residency.ensure(Target("senti", 1))


def test_true_label_feedback_drift_and_metrics(fleet: Any) -> None:
    positive = ["the pizza was great and the staff was friendly."] * 30
    body = fleet.http.post("/v1/classify", json={"model": "senti", "input": positive}).json()
    first = body["data"][0]
    assert first["label"] == "positive"
    right = fleet.http.post("/v1/feedback", json={"response_id": first["id"], "label": "positive"})
    wrong = fleet.http.post(
        "/v1/feedback", json={"response_id": body["data"][1]["id"], "label": "negative"}
    )
    assert right.status_code == wrong.status_code == 200, (right.text, wrong.text)
    stored = fleet.server.registry.feedback("senti")
    assert sorted((f["score"], f["correction"]) for f in stored) == [
        (-1.0, "negative"),
        (1.0, "positive"),
    ]
    bad = fleet.http.post("/v1/feedback", json={"response_id": first["id"], "label": "neutral"})
    assert (
        bad.status_code == 400
        and "not one of the classifier's labels ['negative', 'positive']" in bad.text
    )
    report = fleet.admin("/admin/drift?model=senti").json()
    label = report["signals"]["predicted_label"]
    assert label["labels"] == ["negative", "positive"] and label["live"][1] >= 30
    assert label["status"] == "drifted" and label["score"] > 0.25  # all positive, trained 50/50
    assert report["signals"]["top_probability"]["status"] == "not drifted"
    assert report["signals"]["length_stop_share"]["status"] == "no baseline"
    plots = fleet.admin("/admin/dashboard/drift?model=senti").json()["plots"]  # the dashboard
    assert {"predicted_label", "top_probability"} <= set(plots)
    assert all(uri.startswith("data:image/png;base64,iVBOR") for uri in plots.values())
    from prometheus_client import REGISTRY, generate_latest

    metrics = generate_latest(REGISTRY).decode()  # what /metrics of `lorafleet serve` exports
    assert (
        'lorafleet_classifications_total{adapter="senti",label="positive",version="1"}' in metrics
    )
    assert 'lorafleet_classification_top_probability_count{adapter="senti",version="1"}' in metrics
