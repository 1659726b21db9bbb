"""The one config of `lorafleet tune`: YAML plus `key.sub=value` overrides, validated at
load time with every problem reported at once (field path, value, fix)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from registry.problems import parse_assignment, validation_problems
from tuning.errors import ConfigError

Section = ConfigDict(
    extra="forbid", frozen=True, use_attribute_docstrings=True, validate_by_name=True
)


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise ValueError(f"file {path} does not exist")
    return path


ExistingFile = Annotated[Path, AfterValidator(_existing_file)]


def _existing_dir(path: Path) -> Path:
    if not path.is_dir():
        raise ValueError(f"directory {path} does not exist")
    return path


ExistingDir = Annotated[Path, AfterValidator(_existing_dir)]


class DataConfig(BaseModel):
    model_config = Section
    train: list[ExistingFile] = Field(min_length=1)
    """Training files: .jsonl, .json, .csv or .parquet."""
    eval: list[ExistingFile] = []
    """Held-out files; empty: split `eval_fraction` off the training data."""
    format: Literal["completion", "chat", "text"] = "completion"
    """completion: prompt + completion fields; chat: messages; text: text."""
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of the training rows held out when no eval files are given."""
    split_seed: int = 0
    """Seed of the train/eval split."""
    max_length: int = Field(512, ge=8, le=131072)
    """Longest example in tokens; longer ones are dropped and counted, never truncated."""
    dedupe: bool = True
    """Drop exact duplicate rows (counted)."""
    packing: bool = False
    """Pack short examples into rows of max_length tokens, without attention across them."""
    reference_text: ExistingFile | None = None
    """General text for the forgetting check; default: text the project generates."""
    labels: list[str] | None = Field(None, min_length=2)
    """Classification: the class labels in the head's order (default: the training data's,
    sorted); a row with another label is refused."""
    replay: float = Field(0.0, ge=0, lt=1)
    """Share of every batch drawn from general text, against forgetting (0: off)."""
    replay_text: ExistingFile | None = None
    """General text to replay (paragraphs separated by blank lines); default: the
    forgetting check's source, never the windows it measures."""


class UnfreezeConfig(BaseModel):
    model_config = Section
    start_layers: int = Field(1, ge=1)
    """Last layers whose LoRA weights train from the first step."""
    layers_per_stage: int = Field(1, ge=1)
    """Layers unfrozen at each stage (the next earlier ones)."""
    every_steps: int | None = Field(None, ge=1)
    """Optimizer steps per stage."""
    every_epochs: float | None = Field(None, gt=0)
    """Epochs per stage (instead of every_steps)."""

    @model_validator(mode="after")
    def _one_period(self) -> UnfreezeConfig:
        if (self.every_steps is None) == (self.every_epochs is None):
            raise ValueError("set exactly one of every_steps and every_epochs")
        return self


class MethodConfig(BaseModel):
    model_config = Section
    r: int = Field(8, ge=1, le=1024)
    """LoRA rank."""
    alpha: float = Field(16.0, gt=0)
    """LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: list[str] | Literal["all-linear"] = ["q_proj", "v_proj"]
    """Module names to adapt, or all-linear."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    use_dora: bool = False
    """DoRA (weight-decomposed LoRA); recorded in the registry: neither engine serves it yet."""
    modules_to_save: list[str] = []
    """Modules trained in full and saved with the adapter (e.g. lm_head)."""
    layers_to_transform: list[int] | None = None
    """Only adapt these layer indices (all layers if unset)."""
    init_from: ExistingDir | None = None
    """Start from this adapter's LoRA weights (safetensors); its rank, alpha, targets must match."""
    unfreeze: UnfreezeConfig | None = None
    """Gradual unfreezing, e.g. {start_layers: 2, every_steps: 50} (or every_epochs: 1,
    layers_per_stage: 1): earlier layers keep their initial LoRA weights until their stage."""


class TrainingConfig(BaseModel):
    model_config = Section
    lr: float = Field(1e-3, gt=0, le=1)
    """Peak learning rate of the LoRA A matrices (and everything else by default)."""
    lr_ratio_b: float = Field(1.0, gt=0, le=1000)
    """LoRA+ ratio: the B matrices train at lr * lr_ratio_b."""
    lr_modules_to_save: float | None = Field(None, gt=0, le=1)
    """Learning rate of modules_to_save (default: lr)."""
    layer_lr_decay: float = Field(1.0, gt=0, le=1)
    """Layer-wise rates: layer i of L trains at its rate x decay^(L-1-i) (1: off)."""
    class_weights: Literal["none", "balanced"] | dict[str, float] = "none"
    """Classification loss weights: none, balanced (n / (k x count)) or label -> weight."""
    weight_decay: float = Field(0.0, ge=0, le=1)
    """AdamW weight decay on matrices."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: to 0 (cosine, linear) or none (constant)."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warmup."""
    batch_size: int = Field(8, ge=1, le=4096)
    """Examples (or packed rows) per micro-batch and process."""
    grad_accum: int = Field(1, ge=1, le=1024)
    """Micro-batches per optimizer step."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps; overrides epochs."""
    epochs: float = Field(1.0, gt=0, le=1000)
    """Passes over the training data when max_steps is unset."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Gradient clipping norm (none if unset)."""
    eval_every: int = Field(50, ge=1)
    """Optimizer steps between eval-loss measurements."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop after this many evals without improvement; the best weights are kept."""
    early_stopping_min_delta: float = Field(0.0, ge=0)
    """Smallest eval-loss decrease that counts as improvement."""
    checkpoint_every: int | None = Field(None, ge=1)
    """Optimizer steps between checkpoints (none if unset)."""
    resume: bool = True
    """Continue from the last checkpoint in output.dir if there is one."""
    seed: int = 0
    """Seed of adapter initialisation, data order and dropout."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Base model weights dtype; LoRA weights train in fp32. auto: bf16 where the CPU has
    AMX or AVX512-BF16 (or on a GPU with bf16), else fp32; the run records the one used."""
    threads: int | None = Field(None, ge=1, le=1024)
    """torch threads; unset: every core, fewer while other processes keep one busy."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% slower)."""
    log_every: int = Field(10, ge=1)
    """Optimizer steps between progress-bar updates."""


class EvaluationConfig(BaseModel):
    model_config = Section
    generate: bool = True
    """Exact match and token F1 by greedy generation (completion data)."""
    max_new_tokens: int = Field(32, ge=1, le=4096)
    """Generation limit of that check."""
    max_examples: int = Field(200, ge=1)
    """Held-out examples used for generation metrics."""
    batch_size: int = Field(16, ge=1)
    """Examples per evaluation batch."""
    forgetting: bool = True
    """Perplexity on general text with and without the adapter."""


class OutputConfig(BaseModel):
    model_config = Section
    dir: Path
    """Run directory: adapter/, checkpoints/, loss.png."""
    overwrite: bool = False
    """Allow writing into a directory that holds a finished run."""


class RegisterConfig(BaseModel):
    model_config = Section
    name: str | None = None
    """Register the adapter under this name when training succeeds."""
    alias: str | None = None
    """Also point this alias (e.g. staging) at the new version."""
    home: Path | None = None
    """Registry directory (default $LORAFLEET_HOME or ~/.lorafleet)."""

    @model_validator(mode="after")
    def _names(self) -> RegisterConfig:
        from registry.errors import InvalidName
        from registry.names import check_name

        if self.alias and not self.name:
            raise ValueError("alias needs a name to register (register.name / --register)")
        try:
            if self.name:
                check_name(self.name)
            if self.alias:
                check_name(self.alias, "alias")
        except InvalidName as err:
            raise ValueError(str(err)) from err
        return self


class TuneConfig(BaseModel):
    model_config = Section
    base: Path
    """Base model directory (a Hugging Face model with safetensors weights)."""
    base_build: Literal["tiny", "small"] | None = None
    """If `base` does not exist, build this offline base model there first."""
    task: Literal["generation", "classification"] = "generation"
    """generation: a causal-LM adapter; classification: LoRA plus a new head trained in full,
    on rows with `text` and `label` columns (data.format does not apply)."""
    data: DataConfig
    method: MethodConfig = MethodConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    output: OutputConfig
    # "register" would shadow BaseModel.register (from ABCMeta); YAML keeps the short name.
    registry: RegisterConfig = Field(RegisterConfig(), alias="register")
    """Where and under which name the result is registered."""

    @model_validator(mode="after")
    def _task(self) -> TuneConfig:
        if self.task == "classification":
            if self.data.packing:
                raise ValueError(
                    "task classification scores one text per row: set data.packing false"
                )
            if self.data.replay:
                raise ValueError(
                    "task classification has no text loss to replay: set data.replay 0"
                )
        elif self.data.labels is not None or self.training.class_weights != "none":
            raise ValueError("data.labels and training.class_weights need task: classification")
        return self

    @model_validator(mode="after")
    def _replay_rows(self) -> TuneConfig:
        size, share = self.training.batch_size, self.data.replay
        rows = round(share * size)
        if share and not 1 <= rows <= size - 1:
            raise ValueError(
                f"data.replay {share} of training.batch_size {size} gives {rows} replayed "
                f"rows per batch; it must leave 1 to {size - 1}: change data.replay or raise "
                "training.batch_size"
            )
        return self

    @model_validator(mode="after")
    def _base_exists(self) -> TuneConfig:
        if self.base_build is None and not (self.base / "config.json").is_file():
            raise ValueError(f"base: {self.base} has no config.json (or set base_build: tiny)")
        return self


def set_override(data: dict[str, Any], override: str) -> None:
    """Apply one `key.sub=value` override (value parsed as YAML) to a raw config dict."""
    try:
        key, value = parse_assignment(override)
    except ValueError as err:
        raise ConfigError(f"override {override!r} is not KEY=VALUE, e.g. training.lr=3e-4") from err
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: Path | None, overrides: list[str] = []) -> TuneConfig:  # noqa: B006
    """Read YAML, apply overrides, validate; ConfigError lists every problem."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read config {path}: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path} is not a YAML mapping")
        data = loaded
    for override in overrides:
        set_override(data, override)
    try:
        return TuneConfig.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(validation_problems(err, root="(config)"))
        where = path or "the command line"
        raise ConfigError(f"{len(err.errors())} problem(s) in {where}: {problems}") from err


def default_yaml() -> str:
    """A complete config with every default, each field commented with its docstring."""
    lines = ["# lorafleet tune config: every field with its default."]
    _describe(TuneConfig, lines, indent="")
    return "\n".join(lines) + "\n"


def _describe(model: type[BaseModel], lines: list[str], indent: str) -> None:
    placeholders = {"base": "path/to/base-model", "dir": "runs/my-adapter"}
    for attribute, field in model.model_fields.items():
        name = field.alias or attribute
        if field.description and not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            lines += [f"{indent}# {line.strip()}" for line in field.description.splitlines()]
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(f"{indent}{name}:")
            _describe(annotation, lines, indent + "  ")
            continue
        if field.is_required():
            value: Any = placeholders.get(name, ["data/train.jsonl"] if name == "train" else None)
            lines[-1:] = [lines[-1] + " (required)"] if field.description else lines[-1:]
        else:
            value = field.get_default(call_default_factory=True)
        if isinstance(value, Path):
            value = str(value)
        dumped = yaml.safe_dump({name: value}, default_flow_style=True, width=1000).strip()
        lines.append(f"{indent}{dumped[1:-1]}")
