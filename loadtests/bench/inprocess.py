"""The two non-HTTP sides of the throughput figures, each run in a fresh process so that no
other torch work shares it (see serving.engines.hf on OpenMP teams):

- `engine`: the hf engine called in-process on the same batch as the HTTP round (B3);
- `naive`: what a user writes with PEFT alone, one request at a time: `set_adapter`, then
  `generate` (B2).

    python -m loadtests.bench.inprocess engine|naive --base DIR --home DIR --setup JSON
        --models JSON --texts JSON

Prints one JSON line: the tokens/s of each repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtests.bench.common import Setup, adapter_paths


def engine_rounds(
    base: Path, home: Path, setup: Setup, models: list[str], texts: list[str]
) -> list[float]:
    from transformers import AutoTokenizer

    from serving.engines.hf import HFEngine

    names = sorted({m for m in models if m != "base"})
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    engine = HFEngine(
        base,
        dtype=setup.dtype,
        max_batch=setup.streams,
        max_len=512,
        adapter_slots=setup.adapters,
        max_rank=setup.rank,
        compile=setup.compile,
        threads=(os.cpu_count() or 1) if setup.compile else None,  # as common.serve_args
    )
    for name, path in adapter_paths(home, names).items():
        engine.load_adapter(f"{name}@1", path)
    keys = [None if m == "base" else f"{m}@1" for m in models]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    try:
        engine_round(engine, keys, ids, 8)  # warm-up
        return [engine_round(engine, keys, ids, setup.new_tokens) for _ in range(setup.repeats)]
    finally:
        engine.shutdown()


def engine_round(
    engine: Any, keys: list[str | None], ids: list[list[int]], new_tokens: int
) -> float:
    from serving.engines.seam import GenerationRequest, SamplingParams

    done = threading.Semaphore(0)
    counts = [0] * len(keys)

    def callback(i: int) -> Callable[[Any], None]:
        def on_event(event: Any) -> None:
            if event.token_id is None:
                done.release()
            else:
                counts[i] += 1

        return on_event

    started = time.perf_counter()
    for i, (key, prompt) in enumerate(zip(keys, ids, strict=True)):
        request = GenerationRequest(
            uuid.uuid4().hex, prompt, SamplingParams(max_new_tokens=new_tokens), key
        )
        engine.submit(request, callback(i))
    for _ in keys:
        done.acquire()
    return sum(counts) / (time.perf_counter() - started)


def naive_rounds(
    base: Path, home: Path, setup: Setup, models: list[str], texts: list[str]
) -> list[float]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = sorted({m for m in models if m != "base"})
    dtype = torch.bfloat16 if setup.dtype == "bf16" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model: Any = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    for i, (name, path) in enumerate(adapter_paths(home, names).items()):
        if i == 0:
            model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
        else:
            model.load_adapter(str(path), adapter_name=name)
    model.eval()

    def one_round() -> float:
        total, started = 0, time.perf_counter()
        for name, text in zip(models, texts, strict=True):
            ids = tokenizer(text, return_tensors="pt")
            with torch.no_grad():
                if name == "base":
                    with model.disable_adapter():
                        out = model.generate(
                            **ids, max_new_tokens=setup.new_tokens, do_sample=False
                        )
                else:
                    model.set_adapter(name)
                    out = model.generate(**ids, max_new_tokens=setup.new_tokens, do_sample=False)
            total += out.shape[1] - ids["input_ids"].shape[1]
        return total / (time.perf_counter() - started)

    return [one_round() for _ in range(setup.repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("side", choices=["engine", "naive"])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--setup", required=True)
    parser.add_argument("--models", required=True)
    parser.add_argument("--texts", required=True)
    args = parser.parse_args()
    setup = Setup(**json.loads(args.setup))
    run = engine_rounds if args.side == "engine" else naive_rounds
    values = run(args.base, args.home, setup, json.loads(args.models), json.loads(args.texts))
    print(json.dumps(values))


if __name__ == "__main__":
    main()
