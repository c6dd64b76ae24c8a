"""What ``sdpa`` hands CUDA's kernels: aligned rows, head dims of whole 16-byte vectors, no
one-row cuDNN blocks.

Each rule here came from ``experiments/gpu_fuzz.py`` on an H200 (docs/benchmarks/h200_perf.md,
step 41), where breaking it gave a silent wrong answer or a crash: cuDNN read the last 40 of 44
head dims 1.4 off (relative); torch's FlashAttention refused a head dim of 20; cuDNN's backward
refused (or crashed on) blocks of one row. CPU kernels take any layout, so these tests run the
CUDA rules on the CPU by listing "cpu" among the device types they apply to.
"""

from __future__ import annotations

import pytest
import torch
from conftest import deterministic_algorithms, rel_err
from test_strategies import check_against_oracle

import ringattn
from ringattn import core, reference
from ringattn.computers import sdpa
from ringattn.computers.sdpa import SDPAComputer


def misaligned_views() -> dict[str, torch.Tensor]:
    """``[b, n, h, d]`` views that start or step off a 16-byte boundary."""
    half = torch.randn(2, 5, 3, 44, dtype=torch.float16)
    flat = torch.randn(1 + 2 * 5 * 3 * 8)
    flat_half = torch.randn(4 + 2 * 5 * 3 * 8, dtype=torch.float16)
    rows = torch.randn(2, 5, 3, 12, dtype=torch.float16)
    return {
        "last d of a wider head dim": half[..., 4:],  # starts 8 bytes into a vector
        "storage offset of one float": flat[1:].view(2, 5, 3, 8),
        # 8 bytes in, every stride whole vectors: only the start is off (8-byte aligned, not 16)
        "storage offset of half a vector": flat_half[4:].view(2, 5, 3, 8),
        "rows 24 bytes apart": rows[..., :8],
    }


def aligned_views() -> dict[str, torch.Tensor]:
    qkv = torch.randn(2, 5, 3, 3, 8)
    return {
        "contiguous": torch.randn(2, 5, 3, 8),
        "fused qkv projection": qkv.unbind(2)[1],
        "[b, h, n, d] transposed": torch.randn(2, 3, 5, 8).transpose(1, 2),
        "one row in": torch.randn(2, 6, 3, 8)[:, 1:],
        # a dim of size 1 is never stepped, so its stride (4 bytes) does not matter
        "one head of [b, n, d, h] storage": torch.randn(2, 6, 8, 1)[:, 1:].transpose(2, 3),
        "rows of 20 bytes (padded later)": torch.randn(2, 5, 3, 10, dtype=torch.float16),
    }


@pytest.fixture
def cpu_as_cuda(monkeypatch):
    monkeypatch.setattr(core, "ALIGNED_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(sdpa, "PADDED_DEVICE_TYPES", ("cpu", "cuda"))


@pytest.mark.parametrize("name", list(misaligned_views()))
def test_misaligned_views_are_copied_to_aligned_memory(cpu_as_cuda, name):
    x = misaligned_views()[name]
    got = core.kernel_aligned(x)
    assert got.data_ptr() % 16 == 0 and got.is_contiguous()
    assert got.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    assert torch.equal(got, x)


@pytest.mark.parametrize("name", list(aligned_views()))
def test_aligned_views_are_kept(cpu_as_cuda, name):
    x = aligned_views()[name]
    assert core.kernel_aligned(x) is x


def test_the_cpu_kernels_take_any_layout():
    x = misaligned_views()["last d of a wider head dim"]
    assert core.kernel_aligned(x) is x


def test_every_kernel_call_gets_aligned_rows(cpu_as_cuda, monkeypatch):
    """The core aligns q, k, v (forward and backward) and dout before any block view is taken:
    every view the kernel is handed starts on a 16-byte boundary, and the answer is the
    oracle's."""
    starts: list[int] = []
    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    class Aten:
        def __getattr__(self, name):
            return getattr(torch.ops.aten, name)

        @staticmethod
        def _scaled_dot_product_flash_attention_for_cpu(q, k, v, *args, **kwargs):
            starts.extend(x.data_ptr() % 16 for x in (q, k, v))
            return kernel(q, k, v, *args, **kwargs)

    monkeypatch.setattr(sdpa, "aten", Aten())
    aligned: list[tuple] = []
    align = core.kernel_aligned
    monkeypatch.setattr(core, "kernel_aligned", lambda x: aligned.append(x.shape) or align(x))
    opts = {"segment_lengths": (4, 8), "dilation_rates": (1, 2), "causal": True}
    wide = torch.randn(3, 2, 16, 3, 10)
    q, k, v = (x[..., 2:].detach().requires_grad_() for x in wide.unbind(0))  # the last 8 of 10
    assert q.data_ptr() % 16  # the premise: the inputs start mid-vector
    strategy = ringattn.Strategy(dilation="segment_local", computer="sdpa", memory="none")
    attention = ringattn.DilatedAttention(**opts, strategy=strategy, compile=False)
    out = attention(q, k, v)
    assert starts and not any(starts)
    assert len(aligned) == 3
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    assert len(aligned) == 3 + 4  # dout, q, k, v
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = reference.dilated_attention(*ref_in, **opts)
    assert rel_err(out, ref) < 1e-5
    for g, r in zip(grads, torch.autograd.grad(ref, ref_in, grad.double()), strict=True):
        assert rel_err(g, r) < 1e-5


@pytest.mark.parametrize("d", [6, 7, 18])  # 7: d % 4 = 3, the one that pads by 1
def test_head_dims_off_whole_vectors_are_padded(cpu_as_cuda, monkeypatch, d):
    """Zeros appended to the head dim (float32: up to a multiple of 4) reach the kernel, add
    nothing to q . k, and are dropped from the output and gradients."""
    seen: list[int] = []
    kernels = (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention_for_cpu_backward",
    )

    class Aten:
        def __getattr__(self, name):
            op = getattr(torch.ops.aten, name)
            if name not in kernels:
                return op
            return lambda *args, **kwargs: seen.append(args[1].shape[-1]) or op(*args, **kwargs)

    monkeypatch.setattr(sdpa, "aten", Aten())
    problem = {"b": 2, "n": 24, "h": 3, "d": d, "segment_lengths": (4, 8)}
    problem |= {"dilation_rates": (1, 2), "causal": True, "mixing": "lse"}
    strategies = ringattn.Strategy.single_device(computer="sdpa")
    check_against_oracle(problem, torch.float32, strategies)
    assert seen and all(width == -(-d // 4) * 4 for width in seen)


def test_cudnn_takes_no_one_row_blocks(monkeypatch):
    monkeypatch.setattr(sdpa, "CUDNN_AVAILABLE", True)
    computer = SDPAComputer()
    one_row, two_rows = (torch.empty(1, rows, 2, 8, dtype=torch.bfloat16) for rows in (1, 2))
    assert not computer._cudnn(one_row)
    assert computer._cudnn(two_rows)


@pytest.mark.parametrize(("mode", "cudnn"), [("off", True), ("warn_only", True), ("on", False)])
def test_torchs_cudnn_backward_is_left_out_under_deterministic_algorithms(monkeypatch, mode, cudnn):
    """torch's cuDNN backward op has no deterministic schedule; torch's own dispatch leaves it
    out under strict deterministic algorithms (check_cudnn_deterministic), and so does the
    computer's backward, for FlashAttention-2's. Its forward, deterministic, keeps cuDNN."""
    monkeypatch.setattr(sdpa, "CUDNN_AVAILABLE", True)
    computer = SDPAComputer()
    q = torch.empty(1, 2, 2, 8, dtype=torch.bfloat16)
    with deterministic_algorithms(mode != "off", warn_only=mode == "warn_only"):
        assert computer._cudnn(q)
        assert computer._cudnn_backward(q) is cudnn


@pytest.mark.parametrize(
    ("mode", "op"), [("off", "cudnn"), ("warn_only", "cudnn"), ("on", "flash")]
)
def test_the_backward_calls_flash_attention_2_not_torchs_cudnn_op_in_strict_mode(
    monkeypatch, mode, op
):
    """The op :meth:`SDPAComputer.backward` calls on CUDA bf16 blocks (meta tensors stand in:
    neither CPU nor float32, so its CUDA branches decide): torch's cuDNN backward, or under
    strict deterministic algorithms FlashAttention-2's (``_cudnn_backward`` is what decides,
    not only what the test above asks)."""
    monkeypatch.setattr(sdpa, "CUDNN_AVAILABLE", True)
    called: list[str] = []

    class Aten:
        def __getattr__(self, name):
            def kernel(*args, **kwargs):
                called.append(name)
                return tuple(torch.empty_like(args[1]) for _ in range(3))  # (dq, dk, dv)

            return kernel

    monkeypatch.setattr(sdpa, "aten", Aten())
    q = torch.empty(1, 4, 2, 8, dtype=torch.bfloat16, device="meta")
    lse = torch.empty(1, 4, 2, dtype=torch.float32, device="meta")
    with deterministic_algorithms(mode != "off", warn_only=mode == "warn_only"):
        grads = SDPAComputer().backward(q, q, q, q, q, lse, True, 0.5)
    assert called == [f"_scaled_dot_product_{op}_attention_backward"]
    assert all(g.shape == q.shape for g in grads)


def test_the_deterministic_mode_is_a_launch_option():
    """Prepared launches are keyed by the computer's launch options: a mode switched on a live
    module would otherwise keep the launchers (cuDNN's graphs, the grouped backward) of before."""
    computer = SDPAComputer()
    default = computer.launch_options()
    with deterministic_algorithms(True):
        assert computer.launch_options() != default
    assert computer.launch_options() == default
