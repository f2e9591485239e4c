"""blockwise8's C kernels: built and used here, numpy/torch's bytes, a quiet fallback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm_node.compression import DTYPES, decode, encode, native
from swarm_node.compression.blockwise8 import (
    BLOCK_SIZES,
    DYNAMIC_MAP,
    NATIVE_BUILD_MIN_NUMEL,
    THREAD_MIN_NUMEL,
    decode_payload,
    encode_payload,
    payload_nbytes,
)

HAVE_COMPILER = shutil.which(native.compiler()[0]) is not None


@pytest.fixture(scope="module", autouse=True)
def kernel():
    """Builds (or loads) the kernel once; the tests below compare it with SWARM_NODE_NATIVE=0."""
    if os.environ.get("SWARM_NODE_NATIVE", "1") == "0":
        pytest.skip("SWARM_NODE_NATIVE=0 in the environment")
    found = native.decode_kernel()
    if found is None and not HAVE_COMPILER:
        pytest.skip("no C compiler: the kernel cannot be built here")
    return found


def _both(monkeypatch, payload: bytes, numel: int, block: int, dtype=torch.float32):
    """(native, numpy/torch) decodes of one payload."""
    monkeypatch.setenv("SWARM_NODE_NATIVE", "1")
    ours = decode_payload(memoryview(payload), numel, block, dtype)
    monkeypatch.setenv("SWARM_NODE_NATIVE", "0")
    fallback = decode_payload(memoryview(payload), numel, block, dtype)
    monkeypatch.setenv("SWARM_NODE_NATIVE", "1")
    return ours, fallback


def _scalar(kernel, payload: bytes, numel: int, block: int, threads: int) -> torch.Tensor:
    """The kernel's plain C loop, without its AVX-512 VBMI path -> (N,) float32."""
    address = np.frombuffer(payload, dtype=np.uint8).__array_interface__["data"][0]
    out = torch.empty(numel, dtype=torch.float32)
    codes, table = address + 4 * -(numel // -block), DYNAMIC_MAP.__array_interface__["data"][0]
    assert kernel(codes, address, table, out.data_ptr(), numel, block, threads, 0) == 0
    return out


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _random_payload(numel: int, block: int, seed: int) -> bytes:
    """Random codes and absmax of every kind: random bit patterns (NaN, inf, subnormal), zeros,
    +-inf, NaN, ordinary scales."""
    rng = np.random.default_rng(seed)
    blocks = -(numel // -block)
    kinds = rng.integers(0, 6, blocks)
    absmax = np.where(
        kinds == 0,
        rng.integers(0, 2**32, blocks, dtype=np.uint32).view(np.float32),
        rng.lognormal(0, 4, blocks).astype(np.float32),
    )
    absmax[kinds == 1] = 0.0
    absmax[kinds == 2] = np.float32(np.inf) * np.sign(rng.standard_normal(int((kinds == 2).sum())))
    absmax[kinds == 3] = np.nan
    payload = absmax.astype("<f4").tobytes() + rng.integers(0, 256, numel, dtype=np.uint8).tobytes()
    assert len(payload) == payload_nbytes(numel, block)  # our own invariant
    return payload


def test_the_kernel_is_built_and_used_in_this_environment(kernel):
    assert kernel is not None, "a C compiler is here, yet the kernel did not build or load"
    assert native.library_path().exists()
    payload = _random_payload(100, 64, 0)
    address = np.frombuffer(payload, dtype=np.uint8).__array_interface__["data"][0]
    out = torch.empty(100)
    table = DYNAMIC_MAP.__array_interface__["data"][0]
    vbmi = kernel(address + 8, address, table, out.data_ptr(), 100, 64, 1, 1)
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    assert vbmi == ({"avx512f", "avx512bw", "avx512vbmi"} <= flags)  # the fast path, where it can


# inf absmax * the code for 0 is NaN: numpy says so, the kernel and torch do not
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@settings(max_examples=150)
@given(
    st.sampled_from(sorted(BLOCK_SIZES.values())),
    st.integers(1, 3 * 4096 + 77),
    st.integers(0, 2**32 - 1),
    st.sampled_from(sorted(DTYPES)),
)
def test_native_and_fallback_give_the_same_bytes(monkeypatch_module, block, numel, seed, dtype):
    payload = _random_payload(numel, block, seed)
    ours, fallback = _both(monkeypatch_module, payload, numel, block, DTYPES[dtype])
    assert _same_bytes(ours, fallback)
    scalar = _scalar(native.decode_kernel(), payload, numel, block, 1).to(DTYPES[dtype])
    assert _same_bytes(scalar, fallback)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.parametrize("block", sorted(BLOCK_SIZES.values()))
@pytest.mark.parametrize(
    "numel", [THREAD_MIN_NUMEL - 1, THREAD_MIN_NUMEL + 4097, 2048 * 576, 4096 * 41 + 1]
)
def test_threaded_large_tensors_give_the_same_bytes(monkeypatch, block, numel):
    payload = _random_payload(numel, block, numel + block)
    ours, fallback = _both(monkeypatch, payload, numel, block)
    assert _same_bytes(ours, fallback)
    assert _same_bytes(_scalar(native.decode_kernel(), payload, numel, block, 2), fallback)
    threads = torch.get_num_threads()
    try:  # one thread and more than there are blocks
        for count in (1, 100):
            torch.set_num_threads(count)
            again, _ = _both(monkeypatch, payload, numel, block)
            assert _same_bytes(again, fallback)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("codec", sorted(BLOCK_SIZES))
def test_an_unaligned_payload_decodes_the_same(monkeypatch, codec):
    """A payload inside a frame may start at any byte: absmax is read without alignment."""
    x = torch.randn(3, 5000)  # (3, 5000)
    wire = encode(x, codec)
    framed = bytearray(b"\0" + bytes(wire.data))
    numel, block = x.numel(), BLOCK_SIZES[codec]
    ours, fallback = _both(monkeypatch, memoryview(framed)[1:], numel, block)
    assert _same_bytes(ours, fallback)
    assert _same_bytes(ours, decode(wire, max_numel=numel).reshape(-1))


def test_switched_off_it_falls_back(monkeypatch):
    monkeypatch.setenv("SWARM_NODE_NATIVE", "0")
    assert native.decode_kernel() is None
    x = torch.randn(4, 40000)
    y = decode(encode(x, "blockwise8-64"), max_numel=x.numel())
    monkeypatch.setenv("SWARM_NODE_NATIVE", "1")
    assert _same_bytes(y, decode(encode(x, "blockwise8-64"), max_numel=x.numel()))


def _run(code: str, cache, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "SWARM_CACHE_DIR": str(cache), "SWARM_NODE_NATIVE": "1", **env}
    return subprocess.run(
        [sys.executable, "-c", code],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


LAZY = f"""
import torch
from swarm_node.compression import decode, encode, native
path = native.library_path()
assert not path.parent.exists(), "compiled at import"
small = torch.randn({NATIVE_BUILD_MIN_NUMEL - 1})
decode(encode(small, "blockwise8"), max_numel=small.numel())
assert not path.exists(), "compiled for a small tensor"
big = torch.randn({NATIVE_BUILD_MIN_NUMEL})
decode(encode(big, "blockwise8"), max_numel=big.numel())
print(path.exists(), native.decode_kernel(build=False) is not None)
"""


@pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler")
def test_built_lazily_on_the_first_large_decode_and_by_two_processes_at_once(tmp_path):
    assert _run(LAZY, tmp_path / "one").stdout.split() == ["True", "True"]
    code = (
        "import torch; from swarm_node.compression import decode, encode, native\n"
        "x = torch.randn(100000); y = decode(encode(x, 'blockwise8'), max_numel=x.numel())\n"
        "assert native.decode_kernel() is not None and (y - x).abs().max() < 1"
    )
    environ = {**os.environ, "SWARM_CACHE_DIR": str(tmp_path / "two"), "SWARM_NODE_NATIVE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=environ) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert [p.name for p in (tmp_path / "two" / "native").iterdir()] == [native.library_path().name]


FALLBACK = """
import logging, torch
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
from swarm_node.compression import decode, encode, native
x = torch.randn(3, 40000)
for _ in range(3):
    y = decode(encode(x, "blockwise8"), max_numel=x.numel())
assert native.decode_kernel() is None and float((y - x).abs().max()) < 1
"""


@pytest.mark.parametrize("cc", ["/nonexistent/cc", "false"])  # no compiler; a failing one
def test_without_a_working_compiler_it_falls_back_and_says_so_once(tmp_path, cc):
    err = _run(FALLBACK, tmp_path, CC=cc).stderr
    assert err.count("swarm_node.compression.native blockwise8: no native kernels") == 1, err
    assert not list((tmp_path / "native").glob("*.so*"))  # no temporary file left behind


# ---- encoding -------------------------------------------------------------------------------------

HAVE_AVX512F = "avx512f" in (
    set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
)


def _encode_both(monkeypatch, tensor: torch.Tensor, block: int) -> tuple[bytes, bytes]:
    """(native, numpy) payloads of one tensor."""
    monkeypatch.setenv("SWARM_NODE_NATIVE", "1")
    ours = bytes(encode_payload(tensor, block))
    monkeypatch.setenv("SWARM_NODE_NATIVE", "0")
    fallback = bytes(encode_payload(tensor, block))
    monkeypatch.setenv("SWARM_NODE_NATIVE", "1")
    return ours, fallback


def _random_values(numel: int, seed: int, kind: int) -> np.ndarray:
    """(numel,) float32 of one kind: normal at any scale, random finite bit patterns, subnormals,
    signed zeros among normals, a few channels x60, NaN or infinity somewhere."""
    rng = np.random.default_rng(seed)
    if kind == 0:
        return (rng.standard_normal(numel) * 10.0 ** rng.integers(-40, 38)).astype(np.float32)
    if kind == 1:
        bits = rng.integers(0, 2**32, numel, dtype=np.uint64).astype(np.uint32)
        values = bits.view(np.float32)
        return np.where(np.isfinite(values), values, np.float32(1.5))
    if kind == 2:
        return (rng.standard_normal(numel) * 1e-42).astype(np.float32)
    values = rng.standard_normal(numel).astype(np.float32)
    if kind == 3:
        values[: numel // 3] = -0.0
        values[rng.integers(0, numel, 3)] = 0.0
    elif kind == 4:
        values[rng.integers(0, numel, max(1, numel // 100))] *= 60
    else:
        values[rng.integers(0, numel)] = [np.nan, np.inf, -np.inf][seed % 3]
    return values


def _kernel_encode(tensor: torch.Tensor, block: int, threads: int) -> tuple[int, bytes]:
    """What the C encoder returns for a float32 tensor, and its payload."""
    from swarm_node.compression import blockwise8

    x = tensor.reshape(-1).contiguous()
    numel, blocks = x.numel(), -(x.numel() // -block)
    out = np.zeros(payload_nbytes(numel, block), dtype=np.uint8)
    address = out.__array_interface__["data"][0]
    done = native.encode_kernel()(
        x.data_ptr(),
        address,
        address + 4 * blocks,
        blockwise8._LOW32_ADDRESS,
        blockwise8._THRESHOLD_ADDRESS,
        numel,
        block,
        threads,
    )
    return done, out.tobytes()


def test_the_encoder_runs_where_the_cpu_has_avx512f(kernel):
    assert native.encode_kernel() is not None
    x = torch.randn(100)
    done, payload = _kernel_encode(x, 64, 1)
    assert done == (1 if HAVE_AVX512F else 0)
    if done:
        assert payload == bytes(encode_payload(x, 64))
        done, payload = _kernel_encode(torch.tensor([1.0, float("nan")]), 64, 1)
        assert done == -1  # numpy's turn


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@settings(max_examples=200)
@given(
    st.sampled_from([*sorted(BLOCK_SIZES.values()), 1, 7, 100]),
    st.integers(1, 2 * 4096 + 77),
    st.integers(0, 2**32 - 1),
    st.integers(0, 5),
    st.sampled_from(sorted(DTYPES)),
)
def test_native_and_numpy_encode_to_the_same_bytes(
    monkeypatch_module, block, numel, seed, kind, dtype
):
    tensor = torch.from_numpy(_random_values(numel, seed, kind)).to(DTYPES[dtype])
    ours, fallback = _encode_both(monkeypatch_module, tensor, block)
    assert ours == fallback
    if HAVE_AVX512F and kind < 5 and dtype == "float32":  # the kernel itself, not numpy's fallback
        assert _kernel_encode(tensor, block, 1) == (1, fallback)


@pytest.mark.parametrize("block", sorted(BLOCK_SIZES.values()))
@pytest.mark.parametrize("numel", [THREAD_MIN_NUMEL + 4097, 2048 * 576])
def test_threaded_encoding_gives_the_same_bytes(monkeypatch, block, numel):
    tensor = torch.from_numpy(_random_values(numel, numel, 4))
    ours, fallback = _encode_both(monkeypatch, tensor, block)
    assert ours == fallback
    if HAVE_AVX512F:
        for threads in (1, 2, 100):
            assert _kernel_encode(tensor, block, threads) == (1, fallback)
    tensor[-1] = float("nan")  # in the last block: the threads stop, numpy encodes it all
    ours, fallback = _encode_both(monkeypatch, tensor, block)
    assert ours == fallback
    assert np.isnan(np.frombuffer(ours, "<f4", count=-(numel // -block))[-1])


def test_a_strided_tensor_encodes_as_its_copy(monkeypatch):
    base = torch.randn(2 * 5000)
    strided = base[::2]  # (5000,), stride 2: reshape(-1) keeps the view
    ours, fallback = _encode_both(monkeypatch, strided, 64)
    assert ours == fallback == bytes(encode_payload(strided.contiguous(), 64))


def _load_in(cache: Path) -> subprocess.CompletedProcess:
    """A fresh process with ``cache`` as SWARM_CACHE_DIR asks for the kernel: prints 1 or 0."""
    code = (
        "from swarm_node.compression import native; print(int(native.decode_kernel() is not None))"
    )
    env = {**os.environ, "SWARM_CACHE_DIR": str(cache)}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler: nothing is built to refuse")
def test_a_kernel_others_could_replace_is_not_loaded(tmp_path: Path) -> None:
    # Anyone who can replace the library runs code in every peer on the machine that loads it: a
    # folder or file that another user owns or may write, or a link, is refused (numpy decodes).
    first = _load_in(tmp_path)
    assert first.stdout.strip() == "1", first.stderr
    folder = tmp_path / "native"
    (library,) = folder.glob("blockwise8-*.so")
    attacks = [("folder", lambda: folder.chmod(0o777)), ("file", lambda: library.chmod(0o777))]
    if os.getuid() == 0:  # root here (CI): give the file to another user
        attacks.append(("owner", lambda: os.chown(library, 65534, 65534)))
    for name, attack in attacks:
        attack()
        refused = _load_in(tmp_path)
        assert refused.stdout.strip() == "0", (name, refused.stderr)
        assert "not loading the native kernels" in refused.stderr, name
        folder.chmod(0o700)
        library.chmod(0o755)
        os.chown(library, os.getuid(), os.getgid())
        assert _load_in(tmp_path).stdout.strip() == "1", name  # put right, it loads again
    real = folder / "real.so"
    library.rename(real)
    library.symlink_to(real)
    linked = _load_in(tmp_path)
    assert linked.stdout.strip() == "0" and "not loading" in linked.stderr
