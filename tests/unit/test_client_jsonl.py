"""The file side of ``meshllm generate --input``: parsing rows, resume rules, and the bench
recommendation (fast: temporary files, no servers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshllm.api import errors
from meshllm.client._jsonl import DoneSet, parse_row, read_rows, result_row, resume
from meshllm.client._sweep import Level, Sample, recommend, summarize


def test_rows_split_request_fields_from_passthrough() -> None:
    row = parse_row(4, b'{"id": "a7", "prompt": "hi", "max_tokens": 3, "tag": [1]}\n')
    assert row.index == 4
    assert row.request == {"prompt": "hi", "max_tokens": 3}
    assert row.passthrough == {"id": "a7", "tag": [1]}
    chat = parse_row(0, b'{"messages": [{"role": "user", "content": "x"}]}')
    assert chat.request == {"messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize(
    "line", [b"{not json", b"[1, 2]", b'{"id": 1}', b'{"prompt": "a", "messages": []}']
)
def test_unusable_rows_are_invalid_argument(line: bytes) -> None:
    with pytest.raises(errors.InvalidArgument, match="line 3"):
        parse_row(2, line)


def test_error_rows_carry_code_message_and_reason() -> None:
    error = errors.ResourceExhausted("over quota", reason="QUOTA_EXCEEDED")
    assert result_row(9, {"id": 1}, None, error) == {
        "index": 9,
        "id": 1,
        "error": {
            "code": "RESOURCE_EXHAUSTED",
            "message": "over quota",
            "reason": "QUOTA_EXCEEDED",
        },
    }


def lines(*rows: dict[str, object]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def ok(index: int) -> dict[str, object]:
    return {"index": index, "text": "t", "error": None}


def failed(index: int, code: str) -> dict[str, object]:
    return {"index": index, "error": {"code": code, "message": "m", "reason": ""}}


def test_resume_cuts_a_torn_last_line_and_keeps_every_finished_row(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(lines(ok(2), ok(0), failed(5, "INVALID_ARGUMENT")) + b'{"index": 1, "te')
    done = resume(out)
    assert [i for i in range(7) if i in done] == [0, 2, 5]  # a bad request is final
    assert out.read_bytes() == lines(ok(2), ok(0), failed(5, "INVALID_ARGUMENT"))


def test_resume_drops_transient_failures_so_they_run_again(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(
        lines(
            ok(0),
            failed(1, "UNAVAILABLE"),
            ok(2),
            failed(3, "RESOURCE_EXHAUSTED"),
            failed(4, "ABORTED"),
            failed(5, "DEADLINE_EXCEEDED"),
        )
        + b'{"ind'
    )
    done = resume(out)
    assert done.count == 2 and 0 in done and 2 in done and 1 not in done
    assert out.read_bytes() == lines(ok(0), ok(2))
    assert not (tmp_path / "out.jsonl.resume-tmp").exists()


def test_resume_reruns_rows_the_mesh_cancelled_or_cut_short(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    cut = {"index": 3, "text": "par", "finish_reason": "cancelled", "error": None}
    broke = {"index": 4, "text": "x", "finish_reason": "error", "error": None}
    whole = {"index": 5, "text": "all", "finish_reason": "stop", "error": None}
    out.write_bytes(lines(ok(0), failed(1, "CANCELLED"), failed(2, "NOT_FOUND"), cut, broke, whole))
    done = resume(out)
    assert [i for i in range(7) if i in done] == [0, 2, 5]  # NOT_FOUND is final, CANCELLED not
    assert out.read_bytes() == lines(ok(0), failed(2, "NOT_FOUND"), whole)


def test_chat_rows_send_a_text_prompt_as_one_user_message() -> None:
    row = parse_row(0, b'{"prompt": "hi", "id": 1}', chat=True)
    assert row.request == {"messages": [{"role": "user", "content": "hi"}]}
    given = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    line = json.dumps({"messages": given}).encode()
    assert parse_row(0, line, chat=True).request == {"messages": given}  # kept as given


def test_resume_refuses_damage_before_the_end_and_repeated_indexes(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(lines(ok(0)) + b"garbage\n" + lines(ok(1)))
    with pytest.raises(errors.InvalidArgument, match="line 2 is damaged"):
        resume(out)
    out.write_bytes(lines(ok(0), ok(1), ok(0)))
    with pytest.raises(errors.InvalidArgument, match="index 0 appears twice"):
        resume(out)


def test_resume_of_a_missing_file_starts_from_nothing(tmp_path: Path) -> None:
    assert resume(tmp_path / "none.jsonl").count == 0


def test_input_lines_already_done_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "c"}\n')
    done = DoneSet()
    done.add(2)
    assert [i for i, _ in read_rows(src, done)] == [0, 3]


def test_done_set_is_a_bitmap_that_counts_once() -> None:
    done = DoneSet()
    for index in (0, 7, 8, 999_999, 8):
        done.add(index)
    assert done.count == 4 and 999_999 in done and 9 not in done and "x" not in done


def level(c: int, tokens_per_s: float, p99_s: float, errors: int = 0) -> Level:
    samples = [Sample(latency_s=p99_s, ttft_s=0.01, tokens=int(tokens_per_s))]
    return summarize(c, samples, errors, seconds=1.0)


def test_recommendation_is_the_lowest_level_near_peak_within_the_p99_limit() -> None:
    levels = [
        level(1, 100, 0.01),
        level(2, 180, 0.012),
        level(4, 250, 0.02),
        level(8, 310, 0.05),
        level(16, 312, 0.4),
        level(32, 330, 0.9, errors=2),
    ]
    best, within = recommend(levels), recommend(levels, max_p99_ms=30)
    assert best is not None and best.concurrency == 8  # 310 >= 95 % of 312; 32 had errors
    assert within is not None and within.concurrency == 4
    assert recommend(levels, max_p99_ms=1) is None
