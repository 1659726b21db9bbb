"""Convert a Hugging Face base model to GGUF with llama.cpp's own `convert_hf_to_gguf.py`,
for the llama.cpp peer of `make bench` (loadtests/bench/peers.py).

    python -m loadtests.bench.gguf_convert LLAMA_CPP_SOURCE MODEL_DIR --outtype bf16 --outfile F

Everything after LLAMA_CPP_SOURCE goes to the converter unchanged. The converter runs as
llama.cpp ships it, with two of its methods wrapped:

- A BPE pre-tokenizer whose hash the converter does not know is written as "gpt-2". The
  project's own tokenizer (tuning/tinymodel.py) is byte-level BPE with the GPT-2 split
  regex, which is what llama.cpp's "gpt-2" pre-tokenizer splits by; a known hash keeps the
  converter's own name. The converter otherwise refuses the model.
- A model without `tokenizer.model` does not need the sentencepiece package: the converter
  imports sentencepiece before it looks for the file, and only the FileNotFoundError it
  would then raise makes it fall back to the Hugging Face tokenizer.

Adapters need no wrapping: `convert_lora_to_gguf.py` is run directly.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

UNKNOWN_BPE_PRE = "gpt-2"


def wrap(source: Path) -> Any:
    """Import llama.cpp's converter from `source` (vendor/llama.cpp) with the two wrappers
    in place; return the converter module."""
    sys.path[:0] = [str(source), str(source / "gguf-py")]
    import conversion.base as conversion  # llama.cpp's package, from `source`

    known_pre = conversion.TextModel.get_vocab_base_pre
    sentencepiece = conversion.TextModel._create_vocab_sentencepiece

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return str(known_pre(self, tokenizer))
        except NotImplementedError:
            conversion.logger.info(
                "unknown BPE pre-tokenizer hash: writing tokenizer.ggml.pre=%r", UNKNOWN_BPE_PRE
            )
            return UNKNOWN_BPE_PRE

    def create_vocab_sentencepiece(self: Any) -> Any:
        model = Path(self.dir_model) / "tokenizer.model"
        if not model.is_file():
            raise FileNotFoundError(f"File not found: {model}")
        return sentencepiece(self)

    conversion.TextModel.get_vocab_base_pre = get_vocab_base_pre
    conversion.TextModel._create_vocab_sentencepiece = create_vocab_sentencepiece
    import convert_hf_to_gguf

    return convert_hf_to_gguf


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    source = Path(sys.argv[1])
    converter = wrap(source)
    sys.argv = [str(source / "convert_hf_to_gguf.py"), *sys.argv[2:]]
    converter.main()


if __name__ == "__main__":
    main()
