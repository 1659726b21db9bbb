"""`lorafleet tune`: one LoRA fine-tuning run, read top to bottom.

config -> base and data -> PEFT model -> optimizer (LoRA+ groups) -> loop (accumulation,
schedule, clipping, eval loss, early stopping, checkpoints) -> best weights -> evaluation
against the base -> adapter dir with lorafleet.json, profile.json, loss.png -> register.

Runs as one process, or under `torchrun` / `accelerate launch` with several (gloo on CPU,
nccl on GPUs): each process takes its share of every optimizer step's micro-batches and
DDP averages the gradients; process 0 evaluates, saves and registers.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from registry import Registry, VersionMetadata
from registry.basemodel import inspect_base
from registry.faults import pause_point
from registry.hardware import ThreadTuner, cpu_info, resolve_dtype, usable_cores
from registry.profile import PROFILE_FILE, build_profile
from tuning.checkpoints import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    load_init_weights,
    load_trainable,
    save_checkpoint,
    trainable_state,
)
from tuning.classify import (
    ClassObjective,
    build_classifier,
    class_weights,
    evaluate_classifier,
    label_set,
)
from tuning.config import TrainingConfig, TuneConfig
from tuning.data import IGNORE, DataReport, Example, batches, load_examples, load_tokenizer
from tuning.errors import ConfigError, PackingUnsupported
from tuning.evaluation import evaluate, mean_loss
from tuning.plots import plot_confusion, plot_losses
from tuning.replay import replay_rows, replay_set
from tuning.strategies import Unfreezing, depths, describe_groups, param_groups

if TYPE_CHECKING:
    from peft import PeftModel
    from torch.nn.parallel import DistributedDataParallel

    from registry.records import DatasetInfo

logger = logging.getLogger(__name__)
METADATA_FILE = "lorafleet.json"


@dataclass(frozen=True)
class RunResult:
    adapter_dir: Path
    metadata: VersionMetadata
    registered: str | None  # NAME@VERSION


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def lr_factor(step: int, total: int, config: TrainingConfig) -> float:
    """Schedule multiplier for optimizer step `step` (0-based): warmup, then decay."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    if config.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def check_packing(model: torch.nn.Module, pad_id: int) -> None:
    """Packing is used only if two packed examples give the logits they give alone."""
    from tuning.data import pack_batch, pad_batch

    a = Example([5, 6, 7, 8], [5, 6, 7, 8], [])
    b = Example([9, 10, 11], [9, 10, 11], [])
    with torch.no_grad():
        batch = pack_batch([[a, b]], pad_id)
        # Without a KV cache: the model only derives the block mask from position ids then.
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        )
        alone = model(input_ids=pad_batch([b], pad_id)["input_ids"], use_cache=False)
    if not torch.allclose(packed.logits[0, 4:7], alone.logits[0], atol=1e-4):
        raise PackingUnsupported(
            "this model attends across packed examples (its attention ignores restarting "
            "position ids); set data.packing: false"
        )


def build_model(config: TuneConfig, base: Path) -> PeftModel:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if resolve_dtype(config.training.dtype) == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype, use_safetensors=True)
    method = config.method
    lora = LoraConfig(
        r=method.r,
        # peft annotates lora_alpha as int, but uses it only as alpha / r: a float is valid.
        lora_alpha=method.alpha,  # type: ignore[arg-type]
        lora_dropout=method.dropout,
        target_modules=method.target_modules,
        use_rslora=method.use_rslora,
        use_dora=method.use_dora,
        modules_to_save=method.modules_to_save or None,
        layers_to_transform=method.layers_to_transform,
    )
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as err:  # peft: target modules not found, bad layer indices
        raise ConfigError(f"method: {err}") from err
    if method.init_from is not None:
        load_init_weights(peft_model, method.init_from, method.alpha)
    if config.training.gradient_checkpointing:
        peft_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        peft_model.enable_input_require_grads()
    return peft_model


def total_steps(config: TuneConfig, micro_batches: int, world: int) -> int:
    if config.training.max_steps:
        return config.training.max_steps
    per_step = config.training.grad_accum * world
    return max(1, math.ceil(config.training.epochs * micro_batches / per_step))


class Objective(Protocol):
    """What the loop minimises: per micro-batch loss, tokens counted, eval loss."""

    @property
    def classes(self) -> dict[str, int] | None:
        """Label -> class index, for classification batches."""

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def tokens(self, batch: dict[str, torch.Tensor]) -> int: ...

    def eval_loss(
        self, model: torch.nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int
    ) -> float: ...


class CausalObjective:
    """Next-token cross-entropy on the labelled tokens (the model's own loss)."""

    classes: dict[str, int] | None = None

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch, use_cache=False).loss  # type: ignore[no-any-return]

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def eval_loss(
        self, model: torch.nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int
    ) -> float:
        return mean_loss(model, examples, batch_size, pad_id)


def epoch_batches(
    train: list[Example],
    config: TuneConfig,
    pad_id: int,
    epoch: int,
    replay: list[Example],
    classes: dict[str, int] | None = None,
) -> list[dict[str, torch.Tensor]]:
    t = config.training
    return batches(
        train,
        batch_size=t.batch_size,
        max_length=config.data.max_length,
        packing=config.data.packing,
        pad_id=pad_id,
        seed=t.seed,
        epoch=epoch,
        replay=replay,
        replay_rows=replay_rows(config.data, t.batch_size),
        classes=classes,
    )


def micro_batch_stream(
    train: list[Example],
    config: TuneConfig,
    pad_id: int,
    start: int,
    replay: list[Example],
    classes: dict[str, int] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Every micro-batch of the run in order, from the `start`-th on (resume)."""
    epoch, index = 0, 0
    while True:
        for batch in epoch_batches(train, config, pad_id, epoch, replay, classes):
            if index >= start:
                yield batch
            index += 1
        epoch += 1


def train_loop(
    config: TuneConfig,
    model: PeftModel,
    train: list[Example],
    held_out: list[Example],
    pad_id: int,
    run_dir: Path,
    *,
    replay: list[Example] = [],  # noqa: B006  (read only)
    objective: Objective = CausalObjective(),  # noqa: B008  (stateless)
    observe: Callable[[TrainState, torch.optim.Optimizer], None] | None = None,
) -> TrainState:
    """The optimisation loop; returns the final state with the best weights loaded.
    `replay`: general-text windows mixed into every batch (data.replay); `objective`: the
    loss (default: the causal LM's);
    `observe(state, optimizer)` runs after every optimizer step."""
    from tqdm import tqdm

    t = config.training
    rank, world = _rank_world()
    per_step = t.grad_accum * world
    n_micro = len(epoch_batches(train, config, pad_id, 0, replay, objective.classes))
    steps = total_steps(config, n_micro, world)
    unfreeze = config.method.unfreeze
    groups = param_groups(model, t, by_layer=unfreeze is not None)
    if rank == 0:
        logger.info("optimizer groups:\n%s", describe_groups(groups))
    optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    stages = (
        Unfreezing.checked(unfreeze, depths(model)[1], math.ceil(n_micro / per_step))
        if unfreeze is not None
        else None
    )
    state, best = TrainState(), None
    checkpoint_dir = run_dir / "checkpoints"
    last = latest_checkpoint(checkpoint_dir) if t.resume else None
    if last is not None:
        state, best = load_checkpoint(last, model, optimizer)
        logger.info("resumed from %s (step %d of %d)", last, state.step, steps)
    if stages is not None and rank == 0 and stages.all_trainable_at() >= steps:
        logger.warning(
            "method.unfreeze: the first layers would join at step %d of %d; they never train",
            stages.all_trainable_at(),
            steps,
        )
    trainable = [p for group in groups for p in group["params"]]
    ddp: PeftModel | DistributedDataParallel = model
    stream = micro_batch_stream(
        train, config, pad_id, state.step * per_step, replay, objective.classes
    )
    interactive = rank == 0 and sys.stderr.isatty()
    bar = tqdm(total=steps, initial=state.step, disable=not interactive, desc="tune", unit="step")
    model.train()
    threads = ThreadTuner(t.threads, most=max(1, usable_cores() // world))
    started, tokens_at_start = time.perf_counter(), state.tokens
    while state.step < steps and not state.stopped_early:
        step_started, step_tokens = time.perf_counter(), state.tokens
        changed = stages is not None and stages.apply(optimizer.param_groups, state.step)
        if stages is not None and changed:
            layers = stages.trainable_layers(state.step)
            if not state.stages or state.stages[-1][1] != layers:
                state.stages.append([state.step, layers])
                if rank == 0:
                    logger.info("step %d: the last %d layers train", state.step, layers)
        if world > 1 and (changed or ddp is model):
            ddp = _wrap(model, world)  # DDP hooks only the parameters that need gradients
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor(state.step, steps, t)
        micro = [next(stream) for _ in range(per_step)][rank::world]
        loss_sum = 0.0
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1 or world == 1
            with ddp.no_sync() if not sync else torch.enable_grad():
                loss = objective.loss(ddp, batch) / len(micro)
                loss.backward()  # type: ignore[no-untyped-call]  # unannotated in torch
            loss_sum += loss.item()
            state.tokens += objective.tokens(batch) * world
        if t.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        threads.observe(time.perf_counter() - step_started, state.tokens - step_tokens)
        if not state.threads or state.threads[-1][1] != threads.current:
            state.threads.append([state.step, threads.current])
        state.step += 1
        if observe is not None:
            observe(state, optimizer)
        state.train_losses.append([state.step, loss_sum])
        if state.step % t.log_every == 0 or state.step == steps:
            rate = (state.tokens - tokens_at_start) / max(time.perf_counter() - started, 1e-9)
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}")
        bar.update(1)
        if state.step % t.eval_every == 0 or state.step == steps:
            best = _evaluate_step(model, held_out, config, pad_id, state, best, trained, objective)
            model.train()
            if rank == 0 and not interactive:
                rate = (state.tokens - tokens_at_start) / max(time.perf_counter() - started, 1e-9)
                logger.info(
                    "step %d/%d  train loss %.4f  eval loss %.4f  lr %.2e  %.0f tok/s",
                    state.step,
                    steps,
                    loss_sum,
                    state.eval_losses[-1][1],
                    optimizer.param_groups[0]["lr"],
                    rate,
                )
        if t.checkpoint_every and state.step % t.checkpoint_every == 0 and state.step < steps:
            if rank == 0:
                path = save_checkpoint(checkpoint_dir, state, model, optimizer, best, trained)
                logger.info("checkpoint %s", path.name)
            pause_point("tune.checkpointed")
    bar.close()
    for param in trainable:  # a run that ended mid-stage leaves no layer frozen
        param.requires_grad_(True)
    if best is not None:
        load_trainable(model, best)
    return state


def _wrap(model: PeftModel, world: int) -> PeftModel | DistributedDataParallel:
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


def _evaluate_step(
    model: torch.nn.Module,
    held_out: list[Example],
    config: TuneConfig,
    pad_id: int,
    state: TrainState,
    best: dict[str, torch.Tensor] | None,
    trained: set[str],
    objective: Objective,
) -> dict[str, torch.Tensor] | None:
    """Eval loss for the curve and early stopping; every process computes the same value,
    so all of them take the same decision."""
    t = config.training
    model.eval()
    loss = objective.eval_loss(model, held_out, config.evaluation.batch_size, pad_id)
    state.eval_losses.append([state.step, loss])
    if state.best_eval_loss is None or loss < state.best_eval_loss - t.early_stopping_min_delta:
        state.best_eval_loss, state.best_step, state.bad_evals = loss, state.step, 0
        return trainable_state(model, trained)
    state.bad_evals += 1
    if t.early_stopping_patience and state.bad_evals >= t.early_stopping_patience:
        state.stopped_early = True
        logger.info(
            "early stop at step %d: best eval loss %.4f at step %d",
            state.step,
            state.best_eval_loss,
            state.best_step,
        )
    return best


def library_versions() -> dict[str, str]:
    out = {}
    for name in ("lorafleet", "torch", "transformers", "peft", "datasets", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def git_commit() -> str | None:
    """Commit of the lorafleet checkout that ran the training, if it is one."""
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def ensure_base(config: TuneConfig) -> Path:
    if not (config.base / "config.json").is_file() and config.base_build:
        from tuning.tinymodel import build_base_model

        logger.info("building the %s base model in %s", config.base_build, config.base)
        build_base_model(config.base, size=config.base_build, seed=0)
    return config.base


def run(config: TuneConfig, *, source: str = "") -> RunResult:
    """Train, evaluate, write the adapter directory and (if configured) register it."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # unannotated upstream
    datasets.disable_progress_bars()
    started = time.time()
    rank, world = _rank_world()
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    # auto becomes this host's dtype (registry/hardware.py), so the saved config says it.
    dtype = resolve_dtype(config.training.dtype)
    config = config.model_copy(
        update={"training": config.training.model_copy(update={"dtype": dtype})}
    )
    run_dir = config.output.dir
    adapter_dir = run_dir / "adapter"
    if (adapter_dir / METADATA_FILE).exists() and not config.output.overwrite:
        raise ConfigError(
            f"output.dir {run_dir} holds a finished run; choose another output.dir or set "
            "output.overwrite=true"
        )
    base = ensure_base(config)
    base_info = inspect_base(base)
    if config.registry.name and rank == 0:
        # Before training: a registry bound to another base refuses now, not after the run.
        Registry.create(config.registry.home, base).close()
    torch.manual_seed(config.training.seed)
    tokenizer = load_tokenizer(base)
    train, held_out, report = load_examples(config.data, tokenizer, config.task)
    logger.info(
        "data: %d rows, %d duplicates and %d over max_length %d dropped; %d train, %d eval",
        report.rows,
        report.duplicates,
        report.too_long,
        config.data.max_length,
        report.train,
        report.eval,
    )
    labels: list[str] | None = None
    objective: Objective = CausalObjective()
    if config.task == "classification":
        labels = label_set(config, train, held_out)
        classes = {label: i for i, label in enumerate(labels)}
        objective = ClassObjective(classes, class_weights(config, train, labels))
        logger.info("labels: %s", ", ".join(labels))
        model = build_classifier(config, base, labels, tokenizer.pad_token_id)
    else:
        model = build_model(config, base)
    if config.data.packing:
        check_packing(model, tokenizer.pad_token_id)
    replay = replay_set(tokenizer, config.data)
    if replay:
        logger.info(
            "replay: %d of every %d rows from %d windows of general text",
            replay_rows(config.data, config.training.batch_size),
            config.training.batch_size,
            len(replay),
        )
    state = train_loop(
        config,
        model,
        train,
        held_out,
        tokenizer.pad_token_id,
        run_dir,
        replay=replay,
        objective=objective,
    )
    if rank != 0:
        torch.distributed.barrier()  # process 0 evaluates, saves and registers meanwhile
        torch.distributed.destroy_process_group()
        return RunResult(adapter_dir, VersionMetadata(), None)
    if isinstance(objective, ClassObjective):
        metrics = evaluate_classifier(
            model, train, held_out, objective, config, tokenizer.pad_token_id
        )
    else:
        metrics = evaluate(model, tokenizer, held_out, config.data, config.evaluation)
    metrics["train"] = {
        "steps": state.step,
        "tokens": state.tokens,
        "best_eval_loss": state.best_eval_loss,
        "best_step": state.best_step,
        "stopped_early": state.stopped_early,
        "final_train_loss": state.train_losses[-1][1] if state.train_losses else None,
        "processes": world,
        "eval_losses": state.eval_losses,
        "dtype": config.training.dtype,
        "cpu": cpu_info().as_dict(),
        "threads": state.threads,  # [first step, torch threads] per change
    }
    if state.stages:
        metrics["train"]["unfreeze_stages"] = state.stages  # [first step, last layers trained]
    if replay:
        metrics["train"]["replay"] = {
            "share": config.data.replay,
            "rows_per_batch": replay_rows(config.data, config.training.batch_size),
            "windows": len(replay),
        }
    adapter_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(adapter_dir))  # peft annotates save_directory as str
    profile = build_profile(
        [e.prompt_ids for e in train],
        vocab_size=len(tokenizer),
        completion_lengths=(
            [len(e.input_ids) - len(e.prompt_ids) for e in train]
            if config.data.format != "text" and labels is None
            else None
        ),
        label_counts=metrics["label_counts"] if labels is not None else None,
        mean_top_probability=metrics["mean_top_probability"] if labels is not None else None,
    )
    profile.save(adapter_dir)
    plot_losses(
        adapter_dir / "loss.png",
        state.train_losses,
        state.eval_losses,
        f"{config.registry.name or run_dir.name}: r={config.method.r}",
    )
    if labels is not None:
        plot_confusion(
            adapter_dir / "confusion.png",
            metrics["confusion"],
            f"{config.registry.name or run_dir.name}: held-out predictions",
        )
    elapsed = time.time() - started
    metadata = VersionMetadata(
        base_fingerprint=base_info.fingerprint,
        tokenizer_hash=base_info.tokenizer_hash,
        chat_template_hash=base_info.chat_template_hash,
        dataset=_dataset_info(report),
        training_config=recorded_config(config),
        metrics=metrics,
        library_versions=library_versions(),
        git_commit=git_commit(),
        seed=config.training.seed,
        trigger="manual",
        drift_profile=PROFILE_FILE,
        wall_time_s=elapsed,
        tokens_per_s=state.tokens / elapsed if elapsed > 0 else None,
        labels=labels,
    )
    (adapter_dir / METADATA_FILE).write_text(metadata.model_dump_json(indent=1) + "\n")
    (run_dir / "config.yaml").write_text(_yaml(config))
    registered = _register(config, adapter_dir, source) if config.registry.name else None
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return RunResult(adapter_dir, metadata, registered)


def _dataset_info(report: DataReport) -> DatasetInfo:
    from registry.records import DatasetInfo

    return DatasetInfo(
        fingerprint=report.fingerprint,
        source=", ".join(report.files),
        files=report.files,
        examples=report.train,
    )


def recorded_config(config: TuneConfig) -> dict[str, Any]:
    """The resolved config with absolute paths: a retraining job reads its data files from
    whatever directory it runs in."""
    data: dict[str, Any] = config.model_dump(mode="json", by_alias=True)
    data["base"] = str(config.base.absolute())
    data["output"]["dir"] = str(config.output.dir.absolute())
    data["data"]["train"] = [str(p.absolute()) for p in config.data.train]
    data["data"]["eval"] = [str(p.absolute()) for p in config.data.eval]
    for key in ("reference_text", "replay_text"):
        if (path := getattr(config.data, key)) is not None:
            data["data"][key] = str(path.absolute())
    if config.method.init_from is not None:
        data["method"]["init_from"] = str(config.method.init_from.absolute())
    return data


def _yaml(config: TuneConfig) -> str:
    import yaml

    return str(yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False))


def _register(config: TuneConfig, adapter_dir: Path, source: str) -> str:
    reg = config.registry
    assert reg.name is not None
    registry = Registry.create(reg.home, config.base)  # idempotent; refuses another base
    record = registry.register(reg.name, adapter_dir, reason=f"lorafleet tune {source}".strip())
    if reg.alias:
        registry.set_alias(reg.name, reg.alias, record.version, reason="lorafleet tune")
    registry.close()
    logger.info("registered %s", record.ref)
    return record.ref
