"""The baseline of B7: LoRA fine-tuning as a careful user writes it with transformers and
peft alone (no lorafleet code), on prompt + completion JSONL.

Each example is the tokenized prompt followed by the completion and eos, with labels -100
on the prompt; batches are padded on the right to their longest example
(DataCollatorForSeq2Seq), no packing. The Trainer runs without evaluation, checkpoints or
logging integrations; the eval loss is measured after training, as the token-weighted mean
cross-entropy over the completion tokens of the held-out rows.

Writes a JSON with the training wall time (TrainerCallback: on_train_begin to on_train_end),
the non-padding tokens the Trainer saw, their rate, the eval loss and the step count.

    python loadtests/bench/plain_trainer.py BASE TRAIN.jsonl EVAL.jsonl OUT.json [options]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

IGNORE = -100


class TrainClock(TrainerCallback):
    """Wall time of the training loop alone (model loading and evaluation are outside)."""

    def __init__(self) -> None:
        self.started = 0.0
        self.seconds = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.seconds = time.perf_counter() - self.started


def read_examples(path: Path, tokenizer: Any) -> list[dict[str, list[int]]]:
    """Prompt + completion + eos; loss only on the completion and eos."""
    examples = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        prompt = tokenizer(row["prompt"])["input_ids"]
        answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        answer = [*answer, tokenizer.eos_token_id]
        examples.append(
            {
                "input_ids": prompt + answer,
                "attention_mask": [1] * (len(prompt) + len(answer)),
                "labels": [IGNORE] * len(prompt) + answer,
            }
        )
    return examples


@torch.no_grad()
def eval_loss(
    model: Any, examples: list[dict[str, list[int]]], collator: Any, batch_size: int
) -> float:
    """Token-weighted mean cross-entropy over the labelled tokens."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collator(examples[start : start + batch_size])
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits  # (batch, seq, vocab)
        labels = batch["labels"][:, 1:]
        total += F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        ).item()
        count += int((labels != IGNORE).sum())
    return total / max(count, 1)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, help="base model directory")
    parser.add_argument("train", type=Path, help="training JSONL (prompt, completion)")
    parser.add_argument("eval", type=Path, help="held-out JSONL (prompt, completion)")
    parser.add_argument("out", type=Path, help="result JSON to write")
    parser.add_argument("--output-dir", type=Path, required=True, help="Trainer output dir")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    parser.add_argument("--targets", default="q_proj,v_proj", help="comma-separated modules")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--schedule", choices=("cosine", "linear", "constant"), default="cosine")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    set_seed(args.seed)  # before get_peft_model: the LoRA A init draws from it
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    tokenizer = AutoTokenizer.from_pretrained(str(args.base))
    tokenizer.padding_side = "right"  # positions count from the first real token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train = read_examples(args.train, tokenizer)
    held_out = read_examples(args.eval, tokenizer)

    base = AutoModelForCausalLM.from_pretrained(str(args.base), dtype=dtype)
    lora = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        target_modules=args.targets.split(","),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)

    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE)
    training_args = TrainingArguments(
        output_dir=str(args.output_dir),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        lr_scheduler_type=args.schedule,
        warmup_steps=args.warmup_steps,
        weight_decay=0.0,
        max_grad_norm=args.max_grad_norm,
        optim="adamw_torch",
        seed=args.seed,
        use_cpu=True,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        include_num_input_tokens_seen="non_padding",
    )
    clock = TrainClock()
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.train()

    tokens = int(trainer.state.num_input_tokens_seen)
    result = {
        "train_s": clock.seconds,
        "train_tokens": tokens,
        "tokens_per_s": tokens / clock.seconds,
        "steps": int(trainer.state.global_step),
        "train_examples": len(train),
        "eval_examples": len(held_out),
        "eval_loss": eval_loss(model, held_out, collator, args.eval_batch_size),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
