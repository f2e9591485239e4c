"""Tensor codecs: exact and bounded round trips, and decode's checks before it allocates."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from swarm_node.compression import (
    CODECS,
    DTYPES,
    ERROR_BOUNDS,
    check_codec,
    decode,
    encode,
    error_bound,
)
from swarm_node.errors import LocalProtocolError, RemoteProtocolError
from swarm_node.protocol import FrameDecoder, StepRequest, WireTensor, encode_message

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)
dtypes = st.sampled_from(sorted(DTYPES))


def _tensor(array: np.ndarray, dtype: str) -> torch.Tensor:
    return torch.from_numpy(array).to(DTYPES[dtype])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


@settings(max_examples=150)
@given(hnp.arrays(np.float32, shapes), dtypes)
def test_none_is_exact_bit_for_bit(array, dtype):
    x = _tensor(array, dtype)  # NaN, inf and -0.0 included
    y = decode(encode(x, "none"), max_numel=x.numel())
    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.equal(_bits(y), _bits(x))


finite = st.floats(-60000, 60000, width=32, allow_subnormal=True)


@settings(max_examples=150)
@given(st.sampled_from(["float16", "bfloat16"]), dtypes, shapes, st.data())
def test_lossy_codecs_stay_within_their_bound(codec, dtype, shape, data):
    x = _tensor(data.draw(hnp.arrays(np.float32, shape, elements=finite)), dtype)
    wire = encode(x, codec)
    assert wire.dtype == dtype and wire.codec == codec and wire.nbytes == 2 * x.numel()
    y = decode(wire, max_numel=x.numel())
    assert y.dtype == x.dtype and y.shape == x.shape
    relative, absolute = ERROR_BOUNDS[codec]
    if dtype != "float32" and dtype != codec:  # one more rounding back into a 16-bit dtype
        relative, absolute = relative + 2.0**-8, absolute + 2.0**-24
    err = (y.double() - x.double()).abs()
    assert bool((err <= relative * x.double().abs() + absolute).all())


def test_float16_clamps_out_of_range_values_and_keeps_nan():
    x = torch.tensor([1e6, -1e6, 65504.0, float("nan"), float("inf")])
    y = decode(encode(x, "float16"), max_numel=5)
    assert y[:3].tolist() == [65504.0, -65504.0, 65504.0]
    assert torch.isnan(y[3]) and y[4] == 65504.0


def test_bfloat16_keeps_float32_range():
    x = torch.tensor([1e30, -1e-30])
    y = decode(encode(x, "bfloat16"), max_numel=2)
    assert torch.allclose(y, x, rtol=2**-8)


@pytest.mark.parametrize("codec", CODECS)
def test_decoded_tensor_owns_writable_memory(codec):
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    wire = encode(x, codec)
    frozen = WireTensor(wire.codec, wire.dtype, wire.shape, bytes(wire.data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "buffer is not writable"
        y = decode(frozen, max_numel=12)
    expected = decode(encode(x, codec), max_numel=12) + 1  # lossy codecs: their own round trip
    y += 1
    assert frozen.data == bytes(encode(x, codec).data)
    assert torch.equal(y, expected)


def test_encode_accepts_views_grads_and_scalars():
    base = torch.randn(4, 6, requires_grad=True)
    x = base.t()[1:3]  # non-contiguous, requires grad, (2, 4)
    y = decode(encode(x, "none"), max_numel=8)
    assert y.shape == (2, 4) and torch.equal(y, x.detach())
    expanded = torch.tensor(1.5).expand(1, 1)  # stride 0
    assert decode(encode(expanded, "none"), max_numel=1).tolist() == [[1.5]]
    scalar = torch.tensor(2.5, dtype=torch.bfloat16)
    assert decode(encode(scalar, "float16"), max_numel=1).item() == 2.5


def test_none_encode_does_not_copy_a_contiguous_tensor():
    x = torch.zeros(1000)
    wire = encode(x, "none")
    assert np.frombuffer(wire.data, np.uint8).ctypes.data == x.data_ptr()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.zeros(2), "zstd"), "'codec' must be one of"),
        ((torch.zeros(2, dtype=torch.int64), "none"), "'tensor.dtype' must be one of"),
        ((torch.zeros(2, dtype=torch.float64), "float16"), "'tensor.dtype' must be one of"),
        ((torch.zeros((1,) * 9), "none"), "at most 8 dimensions, got 9"),
        (([1.0, 2.0], "none"), "'tensor' must be a torch.Tensor"),
    ],
)
def test_encode_refuses_bad_arguments(args, match):
    with pytest.raises(LocalProtocolError, match=match):
        encode(*args)


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (WireTensor("zstd", "float32", (1,), bytes(4)), "'codec' must be one of"),
        (WireTensor("none", "int64", (1,), bytes(8)), "'dtype' must be one of"),
        (WireTensor("none", "float32", (-1,), b""), "'shape' must be a tuple"),
        (WireTensor("none", "float32", [1], bytes(4)), "'shape' must be a tuple"),
        (WireTensor("none", "float32", (1,) * 9, bytes(4)), "'shape' must be a tuple"),
        (WireTensor("none", "float32", (2, 3), bytes(23)), "must be 24 bytes .* got 23"),
        (WireTensor("none", "float32", (2, 3), bytes(25)), "must be 24 bytes .* got 25"),
        (WireTensor("float16", "float32", (2, 3), bytes(24)), "must be 12 bytes .* got 24"),
        (WireTensor("none", "float32", (2, 3), "x" * 24), "'data' must be bytes"),
    ],
)
def test_decode_refuses_bad_wire_tensors(wire, match):
    with pytest.raises(RemoteProtocolError, match=match):
        decode(wire, max_numel=100)


def test_oversize_numel_is_rejected_without_allocating(monkeypatch):
    def no_allocation(*args, **kwargs):
        raise AssertionError("decode allocated before checking")

    monkeypatch.setattr(torch, "empty", no_allocation)
    huge = WireTensor("none", "float32", (2**40, 2**40), bytes(8))
    with pytest.raises(RemoteProtocolError, match="at most 1000 elements"):
        decode(huge, max_numel=1000)
    short = WireTensor("bfloat16", "float32", (10, 10), bytes(199))
    with pytest.raises(RemoteProtocolError, match="must be 200 bytes"):
        decode(short, max_numel=1000)


@settings(max_examples=300)
@given(
    st.sampled_from([*CODECS, "blockwise8", ""]),
    st.sampled_from([*DTYPES, "int8", "float64"]),
    st.lists(st.integers(0, 2**33), max_size=4).map(tuple),
    st.binary(max_size=64),
)
def test_decode_of_random_payloads_raises_only_remote_protocol_error(codec, dtype, shape, data):
    try:
        y = decode(WireTensor(codec, dtype, shape, data), max_numel=64)
    except RemoteProtocolError:
        return
    assert tuple(y.shape) == shape and y.dtype == DTYPES[dtype]


@settings(max_examples=50)
@given(st.sampled_from(CODECS), dtypes, hnp.arrays(np.float32, shapes, elements=finite))
def test_tensor_through_a_frame_and_back(codec, dtype, array):
    x = _tensor(array, dtype)
    frame = encode_message(StepRequest("s", 4, 7, encode(x, codec)))
    decoder = FrameDecoder()
    decoder.feed(frame[:5])
    assert decoder.next_message() is None
    decoder.feed(frame[5:])
    msg = decoder.next_message()
    assert msg.position == 7
    y = decode(msg.hidden, max_numel=max(1, x.numel()))
    expected = decode(encode(x, codec), max_numel=max(1, x.numel()))
    assert y.dtype == x.dtype and torch.equal(_bits(y), _bits(expected))


def test_absurd_empty_shapes_are_refused_not_crashing() -> None:
    # an empty tensor whose other sides overflow torch's stride arithmetic (found by hypothesis)
    from swarm_node.compression import decode as decode_wire
    from swarm_node.errors import RemoteProtocolError as Refused
    from swarm_node.protocol import WireTensor as Wire

    for codec in ("none", "blockwise8"):
        with pytest.raises(Refused, match="at most 2\\*\\*48 elements"):
            decode_wire(Wire(codec, "float32", (0, 2**30, 2**30, 2**30), b""), max_numel=10**6)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_round_trip_within_the_codec_bound(codec, dtype):
    """The gradient direction: a real gradient (requires grad upstream, from autograd) travels
    under every codec and comes back within the codec's bound, in its own dtype."""
    layer = torch.nn.Linear(576, 576).to(dtype)
    hidden = torch.randn(2, 7, 576, dtype=dtype, requires_grad=True)  # (B, T, H)
    layer(hidden).pow(2).sum().backward()
    grad = hidden.grad  # (B, T, H)
    y = decode(encode(grad, codec), max_numel=grad.numel())
    assert y.dtype == dtype and y.shape == grad.shape
    bound = error_bound(grad, codec)
    if dtype != torch.float32 and codec != "none":  # one more rounding back into bfloat16
        bound = bound + 2.0**-8 * (grad.double().abs() + bound)
    assert bool(((y.double() - grad.double()).abs() <= bound).all())


def test_check_codec_names_the_field_and_the_choices():
    assert check_codec("blockwise8-64") == "blockwise8-64"
    with pytest.raises(
        RemoteProtocolError, match=r"'grad_compression' must be one of .*got 'zstd'"
    ):
        check_codec("zstd", field="grad_compression")
    with pytest.raises(LocalProtocolError, match=r"'compression' must be one of .*got 3"):
        check_codec(3, remote=False)
