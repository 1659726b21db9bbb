"""Incremental detokenization and stop strings (serving/runtime/detokenizer.py): with one
byte per token (the worst case for multi-byte characters and for stop strings split across
tokens) and with the project's byte-level BPE tokenizer, whose token-by-token text must add
up to what the tokenizer decodes at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from serving.runtime.detokenizer import Detokenizer, first_stop, held_back


def byte_decode(ids: list[int]) -> str:
    """A byte-level tokenizer's decode: token i is byte i, invalid UTF-8 becomes U+FFFD."""
    return bytes(ids).decode("utf-8", errors="replace")


def feed(text: str, stops: list[str], *, flush: bool = True) -> tuple[list[str], Detokenizer]:
    """The deltas of `text` fed one byte per token, stopping where the detokenizer stops."""
    detokenizer = Detokenizer(byte_decode, stops)
    deltas = []
    for byte in text.encode():
        deltas.append(detokenizer.add(byte))
        if detokenizer.stopped:
            break
    if flush and not detokenizer.stopped:
        deltas.append(detokenizer.flush())
    return deltas, detokenizer


def test_the_deltas_add_up_to_the_text() -> None:
    deltas, detokenizer = feed("plain text, no stop", [])
    assert "".join(deltas) == "plain text, no stop" == detokenizer.text
    assert len([d for d in deltas if d]) == len("plain text, no stop")  # one per character


def test_a_multi_byte_character_waits_for_its_last_token() -> None:
    deltas, _ = feed("a\u00e9\u4e2d\U0001f600b", [])
    assert [d for d in deltas if d] == ["a", "\u00e9", "\u4e2d", "\U0001f600", "b"]
    # 2, 3 and 4 bytes: the tokens before a character's last byte hand out nothing.
    assert deltas[:2] == ["a", ""] and deltas[2] == "\u00e9"
    assert "\ufffd" not in "".join(deltas)


def test_a_stop_string_split_across_tokens_is_never_sent() -> None:
    deltas, detokenizer = feed("Answer: 42\n###\nmore text", ["###"])
    assert "".join(deltas) == "Answer: 42\n" == detokenizer.text
    assert detokenizer.stopped
    assert not any("#" in d for d in deltas)  # not even the first '#' went out


def test_a_stop_string_split_across_two_deltas_of_several_tokens() -> None:
    """Tokens of several characters: 'EN' ends one token and 'D' starts the next."""
    pieces = ["The ", "answer EN", "D of it"]
    vocab = {i: p for i, p in enumerate(pieces)}
    detokenizer = Detokenizer(lambda ids: "".join(vocab[i] for i in ids), ["END"])
    out = [detokenizer.add(i) for i in range(3)]
    assert out == ["The ", "answer ", ""] and detokenizer.stopped
    assert detokenizer.text == "The answer "


def test_held_back_text_that_is_no_stop_goes_out_later() -> None:
    deltas, detokenizer = feed("a #b ## c", ["###"])
    assert "".join(deltas) == "a #b ## c" and not detokenizer.stopped
    at_hash = deltas[2]  # the first '#' could start '###': held back
    assert at_hash == ""
    assert deltas[3] == "#b"  # and handed out once 'b' shows it is none


def test_held_back_text_is_flushed_at_the_end() -> None:
    deltas, detokenizer = feed("ends with ##", ["###"], flush=False)
    assert "".join(deltas) == "ends with " and detokenizer.flush() == "##"


def test_a_stop_at_the_first_token_sends_nothing() -> None:
    deltas, detokenizer = feed("STOP and the rest", ["STOP"])
    assert "".join(deltas) == "" and detokenizer.stopped and detokenizer.text == ""
    one = Detokenizer(lambda ids: "stop here", ["stop"])
    assert one.add(0) == "" and one.stopped


def test_the_earliest_of_several_stops_cuts() -> None:
    deltas, _ = feed("x END y STOP", ["STOP", "END"])
    assert "".join(deltas) == "x "
    assert first_stop("abcSTOPdefEND", ["END", "STOP"], 0) == 3
    assert held_back("text #", ["###", "#!"], 0) == 1 and held_back("text", ["###"], 0) == 0


def test_no_tokens_after_a_stop() -> None:
    _, detokenizer = feed("a###", ["###"])
    with pytest.raises(AssertionError):
        detokenizer.add(ord("b"))


def test_the_tiny_tokenizer_token_by_token(tiny_base: Path) -> None:
    """The project's byte-level BPE tokenizer: text with multi-byte characters and a stop
    string, fed one real token at a time."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))

    def decode(ids: list[int]) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=True))

    text = "Caf\u00e9 \u00fcber na\u00efve \u2014 the refund ### request \u4e2d\u6587"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    whole = Detokenizer(decode)
    assert "".join([whole.add(i) for i in ids] + [whole.flush()]) == decode(ids)
    cut = Detokenizer(decode, ["###"])
    out = []
    for i in ids:
        out.append(cut.add(i))
        if cut.stopped:
            break
    assert cut.stopped and "".join(out) == decode(ids).split("###")[0]


def test_include_stop_keeps_the_stop_string_and_nothing_after() -> None:
    vocab = ["ab", "c#", "##", "tail"]
    kept = Detokenizer(lambda ids: "".join(vocab[i] for i in ids), ["###"], include_stop=True)
    deltas = [kept.add(i) for i in range(3)]
    assert "".join(deltas) == "abc###" and kept.stopped
    assert kept.text == "abc###"
