"""The one-pass soft-rounding loops against SoftRound's tensor operations, their fallbacks, and
the allocation policy of a reconstruction fit."""
from __future__ import annotations

import shutil

import pytest
import torch

from packptq import runtime
from packptq.quant import kernels
from packptq.quant.quantizer import SoftRound


def _case(seed=0, rows=16, shape=(8, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, *shape, generator=g) * 0.05
    s = (w.abs().amax(dim=(1, 2, 3)) / 3.5).view(-1, 1, 1, 1) * 0.6  # weights past the grid: clamps
    z = torch.full_like(s, 4.0)
    alpha = torch.randn(w.shape, generator=g) * 3  # h clamped at 0 and at 1 for some elements
    alpha[0, 0, 0, 0] = 0.0  # sigmoid 0.5 -> h = 0.5, d = 0 in the regulariser
    return alpha, torch.floor(w / s), s, z, torch.randn(w.shape, generator=g)


def _grad(mode, monkeypatch, alpha, base, s, z, g, beta, qmax=15):
    monkeypatch.setenv("PACKPTQ_KERNELS", mode)
    a = alpha.clone().requires_grad_()
    w, reg = SoftRound.apply(a, base, s, z, qmax, beta)
    ((w * g).sum() + 0.37 * reg).backward()
    return w.detach(), reg.detach(), a.grad


def test_the_loops_build_where_there_is_a_compiler():
    assert (kernels.library() is not None) == (shutil.which("cc") is not None)


@pytest.mark.parametrize("beta", [None, 2.0, 7.3, 20.0])
def test_one_pass_equals_the_tensor_operations(beta, monkeypatch):
    alpha, base, s, z, g = _case()
    assert kernels.applicable(alpha, base, s, z) == (kernels.library() is not None)
    w_e, r_e, g_e = _grad("eager", monkeypatch, alpha, base, s, z, g, beta)
    w_f, r_f, g_f = _grad("auto", monkeypatch, alpha, base, s, z, g, beta)
    torch.testing.assert_close(w_f, w_e, rtol=0, atol=1e-6)
    torch.testing.assert_close(r_f, r_e, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(g_f, g_e, rtol=1e-4, atol=1e-6)
    # the case reaches every branch: gradients cut by both clamps and passed elsewhere
    assert (g_e == 0).sum() > 10 and (g_e != 0).sum() > 10
    if beta is not None:
        assert r_e > 0


def test_scalar_scale_and_zero_point_as_in_the_regulariser(monkeypatch):
    alpha, _, _, _, g = _case(1)
    one, zero, base = torch.ones(()), torch.zeros(()), torch.zeros_like(alpha)
    _, r_e, g_e = _grad("eager", monkeypatch, alpha, base, one, zero, torch.zeros_like(g), 5.0)
    _, r_f, g_f = _grad("auto", monkeypatch, alpha, base, one, zero, torch.zeros_like(g), 5.0)
    torch.testing.assert_close(r_f, r_e, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(g_f, g_e, rtol=1e-4, atol=1e-6)


def test_inputs_the_loops_do_not_take_run_as_tensor_operations(monkeypatch):
    alpha, base, s, z, g = _case()
    assert not kernels.applicable(alpha.double(), base.double(), s.double(), z.double())
    assert not kernels.applicable(alpha.transpose(0, 1), base.transpose(0, 1), s, z)  # strided
    monkeypatch.setenv("PACKPTQ_KERNELS", "eager")
    assert not kernels.applicable(alpha, base, s, z)
    w, _ = SoftRound.apply(alpha.double(), base.double(), s.double(), z.double(), 15, None)
    assert w.dtype == torch.float64


def test_without_a_compiler_soft_rounding_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setenv("PACKPTQ_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    assert kernels.library() is None
    alpha, base, s, z, g = _case()
    assert not kernels.applicable(alpha, base, s, z)
    w, _ = SoftRound.apply(alpha, base, s, z, 15, None)
    assert torch.isfinite(w).all()
    assert not list(tmp_path.rglob("*.so"))


def test_the_allocation_policy_is_restored_even_on_an_error(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("trim", pad))
            return 1

    monkeypatch.setattr(runtime, "_libc", lambda: FakeLibc())
    with pytest.raises(RuntimeError):
        with runtime.reuse_freed_memory():
            assert calls == [(runtime._M_MMAP_MAX, 0), (runtime._M_TRIM_THRESHOLD, 2 ** 31 - 1)]
            raise RuntimeError("boom")
    assert (runtime._M_MMAP_MAX, 65536) in calls and calls[-1] == ("trim", 0)
