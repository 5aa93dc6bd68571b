"""Bounds on what callers send (issue 19): request ids, model names, echoed strings, the
tenants file's priority ceiling, the CTranslate2 seed, text refused before tokenizing."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import USER, tenants_file

from meshllm.api.bounds import bounded, identity_violations, shown
from meshllm.api.errors import InvalidArgument
from meshllm.replica.engines.ctranslate2 import ct2_seed
from meshllm.replica.types import ChatMessage, GenerationRequest
from meshllm.replica.validation import Limits, check_fits, check_input, input_chars
from meshllm.router.tenants import ANONYMOUS, hash_key, load_tenants

LIMITS = Limits(
    context_length=100,
    default_max_tokens=16,
    max_tokens_limit=64,
    vocab_size=300,
    max_input_chars=1000,
)


@pytest.mark.parametrize(
    "request_id", ["0f3c", "job-7:item/3", "a" * 128, "x=1;y=2", "trace@host#1", "[]{}~!$%&*"]
)
def test_ordinary_request_ids_pass(request_id: str) -> None:
    assert identity_violations("demo", request_id) == []


@pytest.mark.parametrize(
    "request_id", ["a\nb", "a b", "a\tb", 'say "hi"', "it's", "back\\slash", "é", "a" * 129, "\x00"]
)
def test_request_ids_that_could_break_a_log_line_are_refused(request_id: str) -> None:
    assert [v.field for v in identity_violations("demo", request_id)] == ["request_id"]


def test_model_names_are_bounded() -> None:
    assert identity_violations("m" * 256, "") == []
    (violation,) = identity_violations("m" * 257, "")
    assert violation.field == "model" and "257 characters" in violation.description


def test_shown_quotes_a_bounded_piece_and_escapes_control_characters() -> None:
    assert shown("demo") == "'demo'"
    assert shown("a\nb") == "'a\\nb'"
    long = shown("x" * 100_000)
    assert long.startswith("'" + "x" * 64 + "'") and "100000 characters" in long
    assert len(long) < 100
    assert bounded("y" * 5000) == "y" * 1021 + "..."
    assert bounded("short") == "short"


def test_ct2_seed_folds_a_uint64_into_32_bits_keeping_high_bits_apart() -> None:
    seeds = [0, 7, 2**32 - 1, 2**32, 2**32 + 7, 2**63, 2**64 - 1]
    folded = [ct2_seed(s) for s in seeds]
    assert all(0 <= f < 2**32 for f in folded)
    assert ct2_seed(7) == 7 and ct2_seed(2**32 - 1) == 2**32 - 1  # 32-bit seeds are kept
    assert ct2_seed(2**32 + 7) != ct2_seed(7)


def test_every_text_field_counts_toward_the_input_limit() -> None:
    req = GenerationRequest(
        request_id="r",
        model="demo",
        messages=(ChatMessage("r" * 10, "c" * 20),),
        instructions="i" * 5,
        stop=("s" * 3,),
    )
    assert input_chars(req) == 38
    roles = GenerationRequest(
        request_id="r", model="demo", messages=(ChatMessage("u", "x"),) * 20, stop=("s" * 200,)
    )
    with pytest.raises(InvalidArgument) as e:  # 40 of messages and 200 of stop: over 200
        check_input(roles, Limits(**{**LIMITS.__dict__, "max_input_chars": 200}))
    assert "240 characters" in e.value.message


def test_a_long_role_and_instructions_with_token_ids_are_refused() -> None:
    long_role = GenerationRequest(
        request_id="r", model="demo", messages=(ChatMessage("r" * 65, "x"),)
    )
    with pytest.raises(InvalidArgument) as e:
        check_input(long_role, LIMITS)
    assert [v.field for v in e.value.field_violations] == ["messages[0].role"]
    ids = GenerationRequest(request_id="r", model="demo", token_ids=(1, 2), instructions="x")
    with pytest.raises(InvalidArgument) as e:
        check_input(ids, LIMITS)
    assert [v.field for v in e.value.field_violations] == ["instructions"]


def test_text_that_cannot_fit_the_context_is_refused_before_tokenizing() -> None:
    # 12 characters at most per token: 1188 characters may still be 99 tokens, 1200 cannot fit
    fits = GenerationRequest(request_id="r", model="demo", prompt="x" * 1188)
    check_fits(fits, LIMITS, max_token_chars=12)
    too_long = GenerationRequest(request_id="r", model="demo", prompt="x" * 1200)
    with pytest.raises(InvalidArgument) as e:
        check_fits(too_long, LIMITS, max_token_chars=12)
    assert "at least 100 tokens" in e.value.message
    check_fits(GenerationRequest(request_id="r", model="demo", token_ids=(1,) * 500), LIMITS, 12)


def test_the_priority_ceiling_defaults_to_normal_and_is_validated(tmp_path: Path) -> None:
    (batch, ops) = load_tenants(Path(tenants_file(tmp_path)))
    assert (batch.max_priority, ops.max_priority) == (0, 0)
    (batch, _) = load_tenants(Path(tenants_file(tmp_path, max_priority=5)))
    assert batch.max_priority == 5
    assert ANONYMOUS.max_priority == 2**31 - 1  # no authentication: nothing to protect
    for bad in ("2147483648", '"high"', "1.5", "true"):
        path = tmp_path / "bad.toml"
        key = hash_key(USER)
        path.write_text(f'[[tenants]]\nname = "b"\nkeys = ["{key}"]\nmax_priority = {bad}\n')
        with pytest.raises(InvalidArgument) as e:
            load_tenants(path)
        assert "tenants[0].max_priority" in e.value.message
