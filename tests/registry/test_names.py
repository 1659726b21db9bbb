from __future__ import annotations

import pytest

from registry.errors import InvalidName
from registry.names import ModelRef, check_name, parse_model_ref


@pytest.mark.parametrize("name", ["a", "support", "sql-v2", "x.y_z", "0abc", "a" * 63])
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "Support", "-a", ".a", "a/b", "../etc", "a..b", "a b", "a" * 64, "base", "é"]
)
def test_invalid_names_say_what_is_allowed(name: str) -> None:
    with pytest.raises(InvalidName, match=r"invalid adapter name|reserved"):
        check_name(name)


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("base", ModelRef(None)),
        ("support", ModelRef("support", alias="production")),
        ("support:canary", ModelRef("support", alias="canary")),
        ("support@12", ModelRef("support", version=12)),
    ],
)
def test_model_ref_grammar(text: str, ref: ModelRef) -> None:
    assert parse_model_ref(text) == ref
    assert str(parse_model_ref(text)) in {text, f"{text}:production"}


@pytest.mark.parametrize("text", ["support@0", "support@x", "support@", "Sup:prod", "a:B", "../x"])
def test_bad_model_refs(text: str) -> None:
    with pytest.raises(InvalidName):
        parse_model_ref(text)
