"""SiLU-and-mul: the Triton kernel against the torch reference, the reference against the formula.

Widths cover one column, an odd count, SmolLM2 (1536) and Llama-8B (14336: 14 column tiles).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from kernel_testing import DTYPES, assert_close

from helixflow.kernels import activation as tri
from helixflow.kernels.reference import activation as ref


def randn(rng: torch.Generator, *shape: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return (torch.randn(shape, generator=rng) * 3).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 7, 1536, 14336])
def test_kernel_matches_reference(
    device: str, rng: torch.Generator, d: int, dtype: torch.dtype
) -> None:
    x = randn(rng, 3, 2 * d, dtype=dtype, device=device)
    out = tri.silu_and_mul(x)
    assert out.shape == (3, d) and out.dtype == dtype
    assert_close(out, ref.silu_and_mul(x), dtype)


@pytest.mark.parametrize("shape", [(1, 2), (2, 1, 14), (5, 3072), (4, 2, 3, 6)], ids=str)
def test_leading_dims(device: str, rng: torch.Generator, shape: tuple[int, ...]) -> None:
    x = randn(rng, *shape, dtype=torch.float16, device=device)
    out = tri.silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    assert_close(out, ref.silu_and_mul(x), torch.float16)


@pytest.mark.parametrize("d", [7, 1536])
def test_strided_rows_into_strided_out(device: str, rng: torch.Generator, d: int) -> None:
    dtype = torch.bfloat16
    x_buf = randn(rng, 5, 2 * d + 11, dtype=dtype, device=device)
    out_buf = randn(rng, 5, d + 4, dtype=dtype, device=device)
    x_before, out_before = x_buf.clone(), out_buf.clone()
    x = x_buf[:, 3 : 3 + 2 * d]
    out = out_buf[:, 4:]
    assert tri.silu_and_mul(x, out=out) is out
    assert_close(out, ref.silu_and_mul(x), dtype)
    assert torch.equal(x_buf, x_before)
    assert torch.equal(out_buf[:, :4], out_before[:, :4])


def test_no_rows(device: str) -> None:
    x = torch.empty(0, 3, 16, device=device)
    assert tri.silu_and_mul(x).shape == (0, 3, 8)


@pytest.mark.parametrize("module", [tri, ref], ids=["triton", "reference"])
def test_extreme_gates(device: str, module: Any) -> None:
    gate = torch.tensor([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4, 3e38]], device=device)
    up = torch.tensor([[2.0, 1.0, -1.0, 5.0, 0.5, -2.0, 1.0, 1.0]], device=device)
    out = module.silu_and_mul(torch.cat((gate, up), dim=-1))
    assert not out.isnan().any()
    expected = gate.double() * torch.sigmoid(gate.double()) * up.double()
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_formula(rng: torch.Generator, dtype: torch.dtype) -> None:
    x = (torch.randn(4, 2 * 96, generator=rng) * 4).to(dtype)
    gate, up = x.double().chunk(2, dim=-1)
    expected = gate / (1 + torch.exp(-gate)) * up
    assert_close(ref.silu_and_mul(x), expected, dtype)


def _bad_calls(device: str) -> list[tuple[str, Callable[[Any], object]]]:
    """(argument named in the error, call of a module's silu_and_mul with it wrong)."""
    x = torch.randn(3, 8, device=device)
    return [
        ("x", lambda m: m.silu_and_mul(x[:, :7])),
        ("x", lambda m: m.silu_and_mul(x[:, :0])),
        ("x", lambda m: m.silu_and_mul(torch.tensor(1.0, device=device))),
        ("x", lambda m: m.silu_and_mul(x.int())),
        ("x", lambda m: m.silu_and_mul([1.0, 2.0])),
        ("out", lambda m: m.silu_and_mul(x, out=torch.empty(3, 8, device=device))),
        ("out", lambda m: m.silu_and_mul(x, out=torch.empty(4, device=device))),
        ("x and out", lambda m: m.silu_and_mul(x, out=torch.empty(3, 4, device=device).half())),
    ]


@pytest.mark.parametrize("module", [tri, ref], ids=["triton", "reference"])
@pytest.mark.parametrize("case", range(len(_bad_calls("cpu"))))
def test_bad_arguments_raise(device: str, module: Any, case: int) -> None:
    name, call = _bad_calls(device)[case]
    with pytest.raises(ValueError, match=f"^{name} "):
        call(module)


def test_kernel_layout_errors(device: str) -> None:
    with pytest.raises(ValueError, match=r"^x must have unit stride"):
        tri.silu_and_mul(torch.randn(8, 3, device=device).t())
    with pytest.raises(ValueError, match=r"^x must have leading dimensions"):
        tri.silu_and_mul(torch.randn(4, 3, 8, device=device).transpose(0, 1))
    with pytest.raises(ValueError, match=r"^out must have unit stride"):
        tri.silu_and_mul(torch.randn(3, 8, device=device), out=torch.empty(4, 3, device=device).t())


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"^x is on cpu"):
        tri.silu_and_mul(torch.randn(2, 8))
