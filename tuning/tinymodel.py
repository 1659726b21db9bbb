"""Offline base models built from a config: a Llama-architecture causal LM with a
byte-level BPE tokenizer trained on generated text, a ChatML chat template, eos and pad.

Nothing is downloaded. The same seed gives byte-identical files: the tokenizer trainer is
deterministic for the same input, and the weights come from a seeded CPU initialisation.
`tiny` (about 0.75M parameters) is for tests; `small` (about 79M) makes benchmarks
meaningful.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tuning.corpus import paragraphs

Size = Literal["tiny", "small"]
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


@dataclass(frozen=True)
class Shape:
    """Transformer dimensions of one size."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int


SHAPES: dict[str, Shape] = {
    "tiny": Shape(128, 256, 2, 4, 2, 1024),
    "small": Shape(1024, 2048, 8, 16, 8, 2048),
}


def build_tokenizer(out_dir: Path) -> int:
    """Train and save the tokenizer; return its vocabulary size."""
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


def build_base_model(out_dir: Path | str, *, size: Size = "tiny", seed: int = 0) -> Path:
    """Write a complete base model directory (config, safetensors, tokenizer) to `out_dir`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # unannotated upstream

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out)
    special = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in special}
    shape = SHAPES[size]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=1e-6,
        # fan-in scale: with 0.02 a narrow model cannot reach confident logits
        initializer_range=shape.hidden_size**-0.5,
        tie_word_embeddings=False,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
    )
    torch.manual_seed(seed)
    # LlamaForCausalLM.__init__ and GenerationConfig.__init__ are unannotated upstream.
    model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    # PreTrainedModel.to is wrapped in functools.wraps, which typeshed types as an unbound
    # callable, so mypy takes the dtype for `self`.
    model = model.to(torch.float32)  # type: ignore[arg-type]
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
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    b_std: float = 0.05,
) -> Path:
    """Write a PEFT LoRA adapter for `base_dir` with seeded random weights.

    PEFT initialises B to zero (an adapter that changes nothing); here B is drawn too, so
    each adapter changes the base's outputs in its own way: stand-ins for trained adapters
    in tests, demos and benchmarks.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # unannotated upstream
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
