"""Offline base models built from a config: a causal LM of any family the hf engine serves
(`ARCHITECTURES`, from registry.families) with a byte-level BPE tokenizer trained on
generated text, a ChatML chat template, eos and pad.

Nothing is downloaded. The same seed gives byte-identical files: the tokenizer trainer is
deterministic for the same input (and runs once per process; later builds copy its files),
and the weights come from a seeded CPU initialisation. `tiny` (about 0.75M parameters for
llama) is for tests; `small` (about 80M) makes benchmarks meaningful.

Each family gets the fields that make its own code paths matter in a model this small
(`family_fields`): a sliding window shorter than a test prompt plus completion, sliding
and full layers side by side, softcapping, Granite's multipliers, SmolLM3's layers without
RoPE, experts. The default llama build is the one this module always wrote.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

from registry.families import HF_FAMILIES
from tuning.corpus import paragraphs

Size = Literal["tiny", "small"]
# The model types build_base_model writes: the families the hf engine serves.
ARCHITECTURES: tuple[str, ...] = tuple(HF_FAMILIES)
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB_SIZE = 4096
CORPUS_PARAGRAPHS = 3000
# Families whose small released checkpoints tie lm_head to the embeddings (Qwen2.5-0.5B,
# Qwen3-0.6B, Gemma 1/2/3, Granite 3 2B, SmolLM3-3B); the others keep them apart (llama
# stays untied, as this module always built it).
TIED_FAMILIES = frozenset(
    {"qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite", "smollm3"}
)
# LoRA targets on the attention of each family: the query and value projections, or the
# fused one where a family has no separate ones. A model type not named here gets the usual
# q_proj and v_proj (peft names the modules it cannot find).
ATTENTION_TARGETS: dict[str, tuple[str, ...]] = {"phi3": ("qkv_proj",)}
DEFAULT_TARGETS = ("q_proj", "v_proj")
EXPERTS = 4
EXPERTS_PER_TOKEN = 2


@dataclass(frozen=True)
class Shape:
    """Transformer dimensions of one size."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    sliding_window: int
    """Tokens a sliding-window layer sees (families with one): below a test prompt plus
    completion for tiny, so the window changes outputs."""


SHAPES: dict[str, Shape] = {
    "tiny": Shape(128, 256, 2, 4, 2, 1024, sliding_window=16),
    "small": Shape(1024, 2048, 8, 16, 8, 2048, sliding_window=256),
}


def default_targets(arch: str) -> tuple[str, ...]:
    """The LoRA target modules on the attention projections of model type `arch`."""
    return ATTENTION_TARGETS.get(arch, DEFAULT_TARGETS)


def family_fields(arch: str, shape: Shape) -> dict[str, Any]:
    """The config fields of `arch` beyond the shape, chosen so that the family's own code
    paths change the outputs of a model of this shape. The others need none: qwen2's q/k/v
    biases, qwen3's and olmo2's q/k norms and phi3's fused projections come with the class."""
    head_dim = shape.hidden_size // shape.num_attention_heads
    window = shape.sliding_window
    # Alternate sliding and full layers, sliding first (Gemma 2's own pattern).
    alternating = [
        "sliding_attention" if i % 2 == 0 else "full_attention"
        for i in range(shape.num_hidden_layers)
    ]
    # Experts split the dense MLP width: the parameter count stays near the dense family's.
    expert_width = shape.intermediate_size // EXPERTS
    gemma_attention = {
        "head_dim": head_dim,  # Gemma configs default to 256 whatever the width
        # Not head_dim, so attention scaled by head_dim**-0.5 instead shows.
        "query_pre_attn_scalar": 2 * head_dim,
        "sliding_window": window,
        "layer_types": alternating,
    }
    fields: dict[str, dict[str, Any]] = {
        "mistral": {"sliding_window": window},  # every layer slides
        "qwen3": {"head_dim": head_dim},  # Qwen3Config defaults head_dim to 128
        "qwen3_moe": {
            "num_experts": EXPERTS,
            "num_experts_per_tok": EXPERTS_PER_TOKEN,
            "moe_intermediate_size": expert_width,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,  # as the released Qwen3 MoE checkpoints
        },
        "mixtral": {
            "num_local_experts": EXPERTS,
            "num_experts_per_tok": EXPERTS_PER_TOKEN,
            "intermediate_size": expert_width,
        },
        "gemma": {"head_dim": head_dim},
        # Caps near the sizes of this model's scores (up to ~3) and logits (~5), so tanh
        # bends them. transformers applies attn_logit_softcapping in eager attention only:
        # its sdpa path drops it, and sdpa is what from_pretrained picks by default.
        "gemma2": {
            **gemma_attention,
            "attn_logit_softcapping": 3.0,
            "final_logit_softcapping": 5.0,
        },
        "gemma3_text": {
            **gemma_attention,
            "rope_theta": 1_000_000.0,  # full layers
            "rope_local_base_freq": 10_000.0,  # sliding layers
        },
        "granite": {
            "embedding_multiplier": 4.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 1.0 / head_dim,  # not head_dim**-0.5
            "logits_scaling": 2.0,
        },
        "smollm3": {"no_rope_layer_interval": 2},  # every second layer has no RoPE
    }
    return fields.get(arch, {})


def build_tokenizer(out_dir: Path) -> int:
    """Save the tokenizer (trained once per process) to `out_dir`; return its vocabulary
    size."""
    files, vocab = _trained_tokenizer()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files:
        (out_dir / name).write_bytes(data)
    return vocab


@cache
def _trained_tokenizer() -> tuple[tuple[tuple[str, bytes], ...], int]:
    """(file name, bytes) of the saved tokenizer, and its vocabulary size."""
    with tempfile.TemporaryDirectory() as tmp:
        vocab = _train_tokenizer(Path(tmp))
        files = tuple((p.name, p.read_bytes()) for p in sorted(Path(tmp).iterdir()))
    return files, vocab


def _train_tokenizer(out_dir: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(paragraphs(CORPUS_PARAGRAPHS, seed=0), trainer=trainer)
    # transformers leaves TokenizersBackend.__init__ (*args, **kwargs) unannotated.
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=SHAPES["tiny"].max_position_embeddings,
        padding_side="left",
    )
    fast.save_pretrained(out_dir)
    return len(fast)


def build_base_model(
    out_dir: Path | str,
    *,
    size: Size = "tiny",
    seed: int = 0,
    arch: str = "llama",
    tie_word_embeddings: bool | None = None,
) -> Path:
    """Write a complete base model directory (config, safetensors, tokenizer) of model type
    `arch` to `out_dir`; `tie_word_embeddings` None takes the family's usual choice."""
    import torch
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.utils import logging as hf_logging

    if arch not in HF_FAMILIES:
        raise ValueError(f"arch {arch!r} is not one of {', '.join(ARCHITECTURES)}")
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # unannotated upstream

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out)
    special = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in special}
    shape = SHAPES[size]
    if tie_word_embeddings is None:
        tie_word_embeddings = arch in TIED_FAMILIES
    fields: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        # fan-in scale: with 0.02 a narrow model cannot reach confident logits
        "initializer_range": shape.hidden_size**-0.5,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids[EOS_TOKEN],
        "pad_token_id": ids[PAD_TOKEN],
    }
    config = AutoConfig.for_model(arch, **{**fields, **family_fields(arch, shape)})
    torch.manual_seed(seed)
    # The family's own class (LlamaForCausalLM, Gemma3ForCausalLM, ...), built the way
    # this module always built Llama. The lazy mapping annotates its items as pairs.
    model_class: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    model = model_class(config).to(torch.float32)
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        eos_token_id=ids[EOS_TOKEN], pad_token_id=ids[PAD_TOKEN], do_sample=False
    )
    model.save_pretrained(out)
    return out


def build_random_adapter(
    base_dir: Path | str,
    out_dir: Path | str,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    target_modules: tuple[str, ...] | None = None,
    seed: int = 0,
    b_std: float = 0.05,
) -> Path:
    """Write a PEFT LoRA adapter for `base_dir` with seeded random weights, on
    `target_modules` (None: `default_targets` of the base's model type).

    PEFT initialises B to zero (an adapter that changes nothing); here B is drawn too, so
    each adapter changes the base's outputs in its own way: stand-ins for trained adapters
    in tests, demos and benchmarks.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # unannotated upstream
    if target_modules is None:
        model_type = json.loads((Path(base_dir) / "config.json").read_text()).get("model_type")
        target_modules = default_targets(str(model_type))
    base = AutoModelForCausalLM.from_pretrained(
        str(base_dir), dtype=torch.float32, use_safetensors=True
    )
    # peft annotates lora_alpha as int, but uses it only as alpha / r: a float is valid.
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]
        target_modules=list(target_modules),
    )
    generator = torch.Generator().manual_seed(seed)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                std = b_std if "lora_B" in name else 1.0 / rank**0.5
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    out = Path(out_dir)
    model.save_pretrained(str(out))  # peft annotates save_directory as str
    return out
