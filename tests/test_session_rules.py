"""The session rules of both ends, sans IO: message in, message out, no swarm, no trio."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest

from swarm_node.errors import RemoteError, RemoteProtocolError, RequestError, SessionError
from swarm_node.node.client.recovery import CALLER_ERRORS
from swarm_node.protocol import (
    ERROR_CODES,
    CloseSessionResponse,
    ErrorResponse,
    FrameDecoder,
    InfoResponse,
    OpenSessionRequest,
    PushStepRequest,
    StepRequest,
    StepResponse,
    WireTensor,
    encode_message,
)
from swarm_node.protocol.client_session import HopAnswers, SessionSteps, answer
from swarm_node.protocol.server_session import (
    PushRefused,
    ServedSpan,
    SessionRules,
    check_open,
    find_session,
    refusal,
)

SERVED = ServedSpan(
    model="tiny",
    start=0,
    end=6,
    dtype="float32",
    compressions=("none", "float16", "auto"),
    max_session_length=32,
    max_sessions_per_peer=2,
    cache_budget_tokens=100,
    max_peer_share=0.5,
    hidden_size=4,
    element_bytes=4,
    token_bytes=256,  # 16 numbers of the hidden size 4: 4 tokens' answers per cache token
)
OPEN = OpenSessionRequest(
    model="tiny", start=0, end=6, max_length=16, dtype="float32", compression="none"
)
PREV = "12D3KooWPrevious"


def hidden(tokens: int) -> WireTensor:
    return WireTensor("none", "float32", (1, tokens, 4), bytes(16 * tokens))


def step(step_id: int, position: int, tokens: int = 1) -> StepRequest:
    return StepRequest(session_id="s1", step_id=step_id, position=position, hidden=hidden(tokens))


def push(step_id: int, position: int, tokens: int = 1) -> PushStepRequest:
    return PushStepRequest(
        session_id="s1", step_id=step_id, position=position, hidden=hidden(tokens)
    )


def over_the_wire(message):
    decoder = FrameDecoder()
    decoder.feed(encode_message(message))
    return decoder.next_message()


def refused(call, *args, **kwargs) -> ErrorResponse:
    """What the server answers when ``call`` refuses (the shell's one conversion), via the wire."""
    with pytest.raises(RequestError) as info:
        call(*args, **kwargs)
    return over_the_wire(refusal(info.value))


# -- the server: opening -----------------------------------------------------------------------


def test_open_reserves_the_cache_and_the_kept_answer() -> None:
    # max_length x batch cache tokens, and the newest answer (max_length x batch x 4 numbers of 4
    # bytes) in tokens of 256 bytes, rounded up
    free = {"peer_sessions": 0, "peer_tokens": 0, "closing": False}
    assert check_open(OPEN, SERVED, cache_tokens_left=100, **free) == 16 + 1
    two = replace(OPEN, batch_size=2)
    assert check_open(two, SERVED, cache_tokens_left=34, **free) == 32 + 2
    assert check_open(replace(OPEN, max_length=1), SERVED, cache_tokens_left=2, **free) == 1 + 1


def test_open_counts_deep_prompts_and_a_client_lora_from_their_declared_sizes() -> None:
    free = {"peer_sessions": 0, "peer_tokens": 0, "cache_tokens_left": 100, "closing": False}
    prompts = WireTensor("none", "float32", (6, 8, 4), b"")  # not decoded: its shape is the size
    opened = replace(OPEN, max_length=1, prompts=prompts)
    assert check_open(opened, SERVED, **free) == 1 + 3 + 1  # 192 numbers: 3 tokens' bytes
    assert check_open(replace(OPEN, max_length=1), SERVED, lora_numel=1000, **free) == 1 + 16 + 1
    answer_ = refused(
        check_open, replace(opened, prompts=WireTensor("none", "float32", (6, 512, 4), b"")),
        SERVED, **free,
    )  # fmt: skip
    assert (answer_.code, answer_.message) == (
        "peer_share",
        "a peer may hold 50 of the 100 cache tokens here: it holds 0 and the session needs "
        "194 tokens (1 cache + 192 deep prompts + 1 kept answer); close one or use another server",
    )


def test_one_peer_holds_at_most_its_share_and_at_least_one_longest_session() -> None:
    state = {"peer_sessions": 1, "cache_tokens_left": 100, "closing": False}
    assert check_open(OPEN, SERVED, peer_tokens=33, **state) == 17  # 50 = half of 100
    answer_ = refused(check_open, OPEN, SERVED, peer_tokens=34, **state)
    assert answer_.code == "peer_share"
    assert answer_.message.startswith(
        "a peer may hold 50 of the 100 cache tokens here: it holds 34"
    )
    assert replace(SERVED, max_peer_share=0.1).max_peer_tokens == 32 + 2  # one 32-token session
    assert replace(SERVED, max_peer_share=1.0).max_peer_tokens == 100


@pytest.mark.parametrize(
    ("fields", "state", "code", "message"),
    [
        ({}, {"closing": True}, "shutting_down", "this server is shutting down; use another"),
        ({"model": "other"}, {}, "unknown_model", "this server serves 'tiny', not 'other'"),
        ({"start": 2, "end": 9}, {}, "out_of_range",
         "blocks 2:9 are not within the served blocks 0:6"),
        ({"start": 3, "end": 3}, {}, "out_of_range", "blocks 3:3 are not within"),
        ({"dtype": "bfloat16"}, {}, "bad_request", "'dtype' must be 'float32' here, got 'bfloat16'"),
        ({"compression": "zip"}, {}, "bad_request",
         "'compression' must be one of ('none', 'float16', 'auto'), got 'zip'"),
        ({"max_length": 33}, {}, "too_long", "'max_length' must be in [1, 32], got 33"),
        ({"batch_size": 65}, {}, "bad_request", "'batch_size' must be in [1, 64], got 65"),
        ({}, {"peer_sessions": 2}, "too_many_sessions", "peer already holds 2 sessions here"),
        ({}, {"cache_tokens_left": 16}, "cache_full",
         "attention cache full: the session needs 17 tokens (16 cache + 1 kept answer), 16 of "
         "100 are free; retry later or use another server"),
    ],
)  # fmt: skip
def test_open_refusals(fields: dict, state: dict, code: str, message: str) -> None:
    kwargs = {"peer_sessions": 0, "peer_tokens": 0, "cache_tokens_left": 100, "closing": False}
    kwargs.update(state)
    answer_ = refused(check_open, replace(OPEN, **fields), SERVED, **kwargs)
    assert answer_.code == code and answer_.message.startswith(message)


# -- the server: steps -------------------------------------------------------------------------


def test_unknown_session_on_this_stream() -> None:
    answer_ = refused(find_session, {"other": object()}, "s1")
    assert answer_ == ErrorResponse("unknown_session", "no session 's1' on this stream")


def test_steps_follow_the_cache_and_duplicates_get_the_same_answer() -> None:
    rules = SessionRules(session_id="s1", max_length=8)
    assert rules.step(step(1, 0, tokens=3), cache_length=0) is None  # compute it
    first = rules.answered(1, hidden(3), pushed=False)
    assert first == StepResponse("s1", 1, hidden(3), pushed=False)
    assert rules.step(step(1, 0, tokens=3), cache_length=3) is first  # a duplicate: no compute
    assert rules.step(step(2, 3), cache_length=3) is None
    rules.answered(2, hidden(1), pushed=True)
    assert rules.last_reply.pushed is True


@pytest.mark.parametrize(
    ("request_", "cache_length", "code", "message"),
    [
        (step(3, 7), 3, "bad_request", "'position' must equal the session's cache length 3, got 7"),
        (step(3, 0), 3, "bad_request", "'position' must equal the session's cache length 3, got 0"),
        (step(1, 3), 3, "bad_request",
         "'step_id' must be above the session's newest step 2 (or equal, to repeat it), got 1"),
        (step(3, 3, tokens=6), 3, "too_long",
         "session max_length is 8: 3 tokens cached + 6 new would exceed it"),
    ],
)  # fmt: skip
def test_bad_steps(request_: StepRequest, cache_length: int, code: str, message: str) -> None:
    rules = SessionRules(session_id="s1", max_length=8)
    rules.answered(2, hidden(3), pushed=False)
    answer_ = refused(rules.step, request_, cache_length)
    assert (answer_.code, answer_.message) == (code, message)


def test_unnumbered_steps_are_never_duplicates() -> None:
    rules = SessionRules(session_id="s1", max_length=8)
    rules.answered(0, hidden(1), pushed=False)
    assert rules.step(step(0, 1), cache_length=1) is None


def test_closed_session_takes_no_steps_nor_pushes() -> None:
    rules = SessionRules(session_id="s1", max_length=8, prev_peer=PREV)
    assert rules.close() == CloseSessionResponse("s1")
    answer_ = refused(rules.step, step(1, 0), 0)
    assert answer_ == ErrorResponse("unknown_session", "no session 's1' on this stream")
    with pytest.raises(PushRefused):
        rules.push(push(1, 0), PREV, 0)


# -- the server: pushed steps ------------------------------------------------------------------


def test_pushes_only_from_the_previous_server() -> None:
    rules = SessionRules(session_id="s1", max_length=8, prev_peer=PREV)
    with pytest.raises(PushRefused, match="stranger pushed to session s1, which takes pushes only"):
        rules.push(push(1, 0), "stranger", 0)
    star = SessionRules(session_id="s1", max_length=8)  # a session opened without push
    with pytest.raises(PushRefused, match="takes pushes only from ''"):
        star.push(push(1, 0), PREV, 0)
    assert rules.push(push(1, 0, tokens=2), PREV, 0) is True


def test_a_pushed_step_done_already_is_dropped_and_a_client_step_repeats_it() -> None:
    rules = SessionRules(session_id="s1", max_length=8, prev_peer=PREV)
    assert rules.push(push(1, 0), PREV, 0) is True
    reply = rules.answered(1, hidden(1), pushed=False)
    assert rules.push(push(1, 0), PREV, 1) is False  # the client sent it first: dropped
    assert rules.step(step(1, 0), 1) is reply  # the client sends it too: the same answer


def test_a_failed_push_is_reported_to_the_client_as_push_failed() -> None:
    rules = SessionRules(session_id="s1", max_length=8, prev_peer=PREV)
    with pytest.raises(RequestError) as info:
        rules.push(push(9, 5), PREV, 2)
    notice = over_the_wire(rules.push_failed(9, info.value))
    assert notice == ErrorResponse(
        "push_failed",
        "pushed step 9: 'position' must equal the session's cache length 2, got 5",
    )
    with pytest.raises(RequestError, match="max_length is 8"):
        rules.push(push(1, 2, tokens=7), PREV, 2)


# -- the client --------------------------------------------------------------------------------


def test_step_ids_and_positions() -> None:
    steps = SessionSteps(max_length=4)
    assert [steps.next_id(), steps.next_id()] == [1, 2]
    steps.check(4)
    steps.advance(3)
    with pytest.raises(SessionError, match="max_length is 4: 3 tokens so far \\+ 2 new"):
        steps.check(2)
    assert steps.position == 3


def test_an_error_answer_becomes_remote_error_once() -> None:
    reply = over_the_wire(ErrorResponse("cache_full", "no room"))
    with pytest.raises(RemoteError) as info:
        answer(reply, InfoResponse, peer="P", asked="InfoRequest")
    assert (info.value.code, info.value.message) == ("cache_full", "no room (from P)")
    assert not isinstance(info.value.__cause__, RemoteError)
    with pytest.raises(RemoteProtocolError, match="P closed the stream instead of answering"):
        answer(None, InfoResponse, peer="P", asked="InfoRequest")
    with pytest.raises(RemoteProtocolError, match="P answered InfoRequest with StepResponse"):
        answer(StepResponse("s", 1, hidden(1)), InfoResponse, peer="P", asked="InfoRequest")


def test_hop_answers() -> None:
    hop = HopAnswers("P")
    assert hop.step_answer(StepResponse("s1", 3, hidden(1)), 3, sent=True).step_id == 3
    assert hop.step_answer(StepResponse("s1", 2, hidden(1)), 3, sent=True) is None  # duplicate
    assert hop.duplicates == 1
    with pytest.raises(RemoteProtocolError, match="P answered step 4, expected 3"):
        hop.step_answer(StepResponse("s1", 4, hidden(1)), 3, sent=True)
    failed = ErrorResponse("push_failed", "pushed step 3: ...")
    assert hop.step_answer(failed, 3, sent=False) is False  # the client sends the step itself
    assert hop.push_failures == 1
    with pytest.raises(RemoteProtocolError, match="P reported a failed push for a step we sent"):
        hop.step_answer(failed, 3, sent=True)
    with pytest.raises(RemoteError, match="too_long: full \\(from P\\)") as info:
        hop.step_answer(ErrorResponse("too_long", "full"), 3, sent=True)
    assert info.value.code == "too_long"


# -- both ends back to back --------------------------------------------------------------------


def test_client_and_server_rules_back_to_back() -> None:
    """A client resends a step the previous server pushed already: the server repeats its answer
    without computing, and the client drops the extra answer while waiting for the next step."""
    client, server = SessionSteps(max_length=8), SessionRules(session_id="s1", max_length=8)
    hop, cache_length, sent = HopAnswers("server"), 0, []
    for tokens in (3, 1):
        request_ = StepRequest("s1", client.next_id(), client.position, hidden(tokens))
        assert server.step(over_the_wire(request_), cache_length) is None
        cache_length += tokens
        sent.append(over_the_wire(server.answered(request_.step_id, request_.hidden, pushed=False)))
        assert hop.step_answer(sent[-1], request_.step_id, sent=True) == sent[-1]
        client.advance(tokens)
        sent.append(over_the_wire(server.step(request_, cache_length)))  # a resent duplicate
    assert hop.step_answer(sent[1], 2, sent=True) is None
    assert (cache_length, client.position, hop.duplicates) == (4, 4, 1)


# -- the one table of error codes --------------------------------------------------------------


def _codes_sent() -> set[str]:
    """Every literal code in a RequestError(...) or ErrorResponse(code=...) of the package."""
    codes: set[str] = set()
    for path in Path("swarm_node").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(
                node.func, ast.Name | ast.Attribute
            ):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
            args = [*node.args[:1], *(k.value for k in node.keywords if k.arg == "code")]
            if name in ("RequestError", "ErrorResponse"):
                codes.update(a.value for a in args if isinstance(a, ast.Constant))
    return codes


def test_error_codes_table_lists_exactly_the_codes_servers_send() -> None:
    sent = _codes_sent()
    assert sent == set(ERROR_CODES), (
        f"sent but not in ERROR_CODES: {sorted(sent - set(ERROR_CODES))}; "
        f"in ERROR_CODES but never sent: {sorted(set(ERROR_CODES) - sent)}"
    )
    assert set(CALLER_ERRORS) <= set(ERROR_CODES)
    assert all(isinstance(v, str) and v for v in ERROR_CODES.values())
