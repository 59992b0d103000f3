"""RMSNorm and the fused residual-add RMSNorm: Triton kernels against the torch reference.

Hidden sizes cover one element, an odd count, SmolLM2 (576), the largest single-pass row (4096)
and a row longer than one block that is not a power of two (5000, walked in two passes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from kernel_testing import DTYPES, assert_close

from helixflow.kernels import norm as tri
from helixflow.kernels.reference import norm as ref

HIDDEN = [1, 7, 576, 4096, 5000]
EPS = 1e-6


def randn(rng: torch.Generator, *shape: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.randn(shape, generator=rng).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_rms_norm_matches_reference(
    device: str, rng: torch.Generator, hidden: int, dtype: torch.dtype
) -> None:
    x = randn(rng, 3, hidden, dtype=dtype, device=device) * 3
    weight = randn(rng, hidden, dtype=dtype, device=device)
    out = tri.rms_norm(x, weight, EPS)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, ref.rms_norm(x, weight, EPS), dtype)


@pytest.mark.parametrize("shape", [(1, 576), (576,), (2, 3, 7), (5, 1, 1)])
def test_rms_norm_leading_dims(device: str, rng: torch.Generator, shape: tuple[int, ...]) -> None:
    x = randn(rng, *shape, dtype=torch.float16, device=device)
    weight = randn(rng, shape[-1], dtype=torch.float16, device=device)
    assert_close(tri.rms_norm(x, weight, EPS), ref.rms_norm(x, weight, EPS), torch.float16)


@pytest.mark.parametrize("hidden", [7, 5000])
def test_rms_norm_strided_rows_into_strided_out(
    device: str, rng: torch.Generator, hidden: int
) -> None:
    dtype = torch.bfloat16
    x_buf = randn(rng, 5, hidden + 13, dtype=dtype, device=device)
    out_buf = randn(rng, 5, hidden + 3, dtype=dtype, device=device)
    out_buf_before = out_buf.clone()
    x = x_buf[:, 5 : 5 + hidden]
    out = out_buf[:, :hidden]
    weight = randn(rng, hidden, dtype=dtype, device=device)
    result = tri.rms_norm(x, weight, EPS, out=out)
    assert result is out
    assert_close(out, ref.rms_norm(x, weight, EPS), dtype)
    assert torch.equal(out_buf[:, hidden:], out_buf_before[:, hidden:])


@pytest.mark.parametrize("hidden", [576, 5000])
def test_rms_norm_out_may_be_x(device: str, rng: torch.Generator, hidden: int) -> None:
    x = randn(rng, 3, hidden, dtype=torch.float32, device=device)
    weight = randn(rng, hidden, dtype=torch.float32, device=device)
    expected = ref.rms_norm(x, weight, EPS)
    assert tri.rms_norm(x, weight, EPS, out=x) is x
    assert_close(x, expected, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_fused_add_rms_norm_equals_unfused(
    device: str, rng: torch.Generator, hidden: int, dtype: torch.dtype
) -> None:
    x = randn(rng, 3, hidden, dtype=dtype, device=device)
    residual = randn(rng, 3, hidden, dtype=dtype, device=device) * 4
    weight = randn(rng, hidden, dtype=dtype, device=device)
    # The unfused sequence the fused kernel stands for.
    expected_residual = residual.clone().add_(x)
    expected_x = ref.rms_norm(expected_residual, weight, EPS)

    result = tri.fused_add_rms_norm(x, residual, weight, EPS)
    assert result is x
    assert_close(residual, expected_residual, dtype)
    assert_close(x, expected_x, dtype)


@pytest.mark.parametrize("hidden", [7, 5000])
def test_fused_add_rms_norm_strided_rows(device: str, rng: torch.Generator, hidden: int) -> None:
    dtype = torch.float16
    x_buf = randn(rng, 3, 2 * hidden + 1, dtype=dtype, device=device)
    res_buf = randn(rng, 3, hidden + 9, dtype=dtype, device=device)
    x_before, res_before = x_buf.clone(), res_buf.clone()
    x = x_buf[:, 1 : hidden + 1]
    residual = res_buf[:, 9:]
    weight = randn(rng, hidden, dtype=dtype, device=device)
    expected_x, expected_residual = x.clone(), residual.clone()
    ref.fused_add_rms_norm(expected_x, expected_residual, weight, EPS)

    tri.fused_add_rms_norm(x, residual, weight, EPS)
    assert_close(residual, expected_residual, dtype)
    assert_close(x, expected_x, dtype)
    # Memory around the views is untouched.
    assert torch.equal(x_buf[:, 0], x_before[:, 0])
    assert torch.equal(x_buf[:, hidden + 1 :], x_before[:, hidden + 1 :])
    assert torch.equal(res_buf[:, :9], res_before[:, :9])


def test_no_rows(device: str) -> None:
    x = torch.empty(0, 64, device=device)
    weight = torch.ones(64, device=device)
    assert tri.rms_norm(x, weight, EPS).shape == (0, 64)
    assert tri.fused_add_rms_norm(x, torch.empty_like(x), weight, EPS) is x


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_hf_llama_math(rng: torch.Generator, dtype: torch.dtype) -> None:
    # Hugging Face LlamaRMSNorm, computed here in float64.
    x = (torch.randn(4, 576, generator=rng) * 5).to(dtype)
    weight = torch.randn(576, generator=rng).to(dtype)
    x64 = x.double()
    variance = x64.pow(2).mean(-1, keepdim=True)
    expected = weight.double() * (x64 * torch.rsqrt(variance + EPS))
    assert_close(ref.rms_norm(x, weight, EPS), expected, dtype)


@pytest.mark.parametrize("module", [tri, ref], ids=["triton", "reference"])
@pytest.mark.parametrize("eps", [1e-8, 1e-2])
def test_eps_inside_the_root(device: str, module: Any, eps: float) -> None:
    # mean(x**2) = 1e-8: eps decides the scale.
    x = torch.full((2, 5), 1e-4, device=device)
    expected = x / (1e-8 + eps) ** 0.5
    assert_close(module.rms_norm(x, torch.ones(5, device=device), eps), expected, torch.float32)


MODULES = [pytest.param(tri, id="triton"), pytest.param(ref, id="reference")]


def _bad_calls(device: str) -> list[tuple[str, Callable[[Any], object]]]:
    """(argument named in the error, call of a module's functions with that argument wrong)."""
    x = torch.randn(3, 8, device=device)
    w = torch.randn(8, device=device)
    return [
        ("x", lambda m: m.rms_norm(x.long(), w, EPS)),
        ("x", lambda m: m.rms_norm(torch.tensor(1.0), w, EPS)),
        ("x", lambda m: m.rms_norm(x[:, :0], w[:0], EPS)),
        ("weight", lambda m: m.rms_norm(x, torch.randn(7), EPS)),
        ("weight", lambda m: m.rms_norm(x, "w", EPS)),
        ("x and weight", lambda m: m.rms_norm(x, w.half(), EPS)),
        ("eps", lambda m: m.rms_norm(x, w, 0.0)),
        ("eps", lambda m: m.rms_norm(x, w, float("inf"))),
        ("out", lambda m: m.rms_norm(x, w, EPS, out=torch.empty(3, 7))),
        ("x and out", lambda m: m.rms_norm(x, w, EPS, out=torch.empty(3, 8).half())),
        ("residual", lambda m: m.fused_add_rms_norm(x, torch.randn(2, 8), w, EPS)),
        ("x and residual", lambda m: m.fused_add_rms_norm(x, x.half(), w, EPS)),
        ("eps", lambda m: m.fused_add_rms_norm(x, x.clone(), w, -1.0)),
    ]


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("case", range(len(_bad_calls("cpu"))))
def test_bad_arguments_raise(device: str, module: Any, case: int) -> None:
    name, call = _bad_calls(device)[case]
    with pytest.raises(ValueError, match=f"^{name} "):
        call(module)


def test_kernel_layout_errors(device: str) -> None:
    x = torch.randn(3, 8, device=device)
    w = torch.randn(8, device=device)
    with pytest.raises(ValueError, match=r"^x must have unit stride"):
        tri.rms_norm(torch.randn(8, 3, device=device).t(), w, EPS)
    with pytest.raises(ValueError, match=r"^x must have leading dimensions"):
        tri.rms_norm(torch.randn(4, 3, 8, device=device).transpose(0, 1), w, EPS)
    with pytest.raises(ValueError, match=r"^weight must be contiguous"):
        tri.rms_norm(x, torch.randn(16, device=device)[::2], EPS)
    with pytest.raises(ValueError, match=r"^residual must have unit stride"):
        tri.fused_add_rms_norm(x, torch.randn(8, 3, device=device).t(), w, EPS)
    with pytest.raises(ValueError, match=r"^weight is on"):
        tri.rms_norm(x, torch.randn(8, device="meta"), EPS)


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"^x is on cpu"):
        tri.rms_norm(torch.randn(2, 8), torch.randn(8), EPS)
    with pytest.raises(ValueError, match=r"^x is on cpu"):
        tri.fused_add_rms_norm(torch.randn(2, 8), torch.randn(2, 8), torch.randn(8), EPS)
