"""The softcap's one-pass map and chain rule on the CPU (csrc/cpu/softcap_map.h, kdfast.cpu_softcap): tanh within 2 ulp
of float64 over every 1021st float bit pattern in [-20, 20], a dense grid and the specials, its derivative 1 - tanh^2
from the argument within 3 float32 epsilons relative however small it is (torch's 1 - tanh^2 of a rounded tanh was 6%
off there), and the torch ops it replaces interchangeable with it at every step (each leaves its tensors as the other
does), so that a chunk mapped one way may take its chain rule the other."""

import pytest
import torch

import kdfast.cpu_softcap as cpu_softcap
from kdfast import native_build
from kdfast.logit_maps import LogitMap
from kdfast.native_build import load_cpu_extension

EPS = 2.0**-23


@pytest.fixture(scope="module")
def ops():
    load_cpu_extension()
    return torch.ops.kdfast_cpu


def _sweep() -> torch.Tensor:
    bits = torch.arange(0, 2**31, 1021, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = x[torch.isfinite(x) & (x.abs() <= 20)]
    dense = torch.linspace(-20.0, 20.0, 400_001)  # every branch's whole range, its seam at 0.625 included
    return torch.cat([x, -x, dense, torch.tensor([0.0, -0.0, 0.625, -0.625, 0.62499994, 43.7, -43.7])])


def test_tanh_within_two_ulp_and_its_derivative_keeps_its_digits(ops):
    x = _sweep()
    out = torch.empty_like(x)
    ops.softcap_map(x.clone(), out, 1.0, 1.0, cpu_softcap.KEEP_NOTHING)
    reference = torch.tanh(x.double())
    magnitude = reference.abs().float()
    ulp = (torch.nextafter(magnitude, torch.tensor(float("inf"))).double() - magnitude.double())
    nonzero = reference != 0
    assert float(((out.double() - reference).abs() / ulp)[nonzero].max()) <= 2.0
    assert torch.equal(out[~nonzero], x[~nonzero])  # +-0 stays +-0
    grad = torch.ones_like(x)
    ops.softcap_chain(grad, x, 1.0, 1.0, False)
    derivative = torch.cosh(x.double()) ** -2
    normal = derivative > 2.0**-100
    assert float(((grad.double() - derivative).abs() / derivative)[normal].max()) <= 3 * EPS
    # torch's 1 - tanh^2 of the rounded tanh, for the record of what the argument form keeps.
    rounded = torch.tanh(x)
    assert float((((1 - rounded * rounded).double() - derivative).abs() / derivative)[normal].max()) > 0.01


def test_specials(ops):
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 100.0, -100.0])
    out = torch.empty_like(x)
    ops.softcap_map(x.clone(), out, 1.0, 2.0, cpu_softcap.KEEP_NOTHING)
    assert out[:2].tolist() == [2.0, -2.0] and out[2].isnan() and out[3:].tolist() == [2.0, -2.0]
    grad = torch.full_like(x, 3.0)
    ops.softcap_chain(grad, x, 1.0, 1.0, False)
    assert grad[[0, 1, 3, 4]].tolist() == [0.0] * 4 and grad[2].isnan()


def test_map_keeps_what_it_says(ops):
    x = torch.randn(3, 1001) * 40
    for keep, expected_x in [(cpu_softcap.KEEP_NOTHING, x), (cpu_softcap.KEEP_TANH, torch.tanh(x / 30.0))]:
        source, out = x.clone(), torch.empty_like(x)
        ops.softcap_map(source, out, 1 / 30.0, 30.0, keep)
        torch.testing.assert_close(out, 30.0 * torch.tanh(x / 30.0), atol=4e-6, rtol=0)
        torch.testing.assert_close(source, expected_x, atol=2e-7, rtol=0)
    source = x.clone()
    ops.softcap_map(source, None, 1 / 30.0, 30.0, cpu_softcap.KEEP_MAPPED)
    torch.testing.assert_close(source, 30.0 * torch.tanh(x / 30.0), atol=4e-6, rtol=0)
    with pytest.raises(RuntimeError, match="out must be shaped like x and apart from it"):
        ops.softcap_map(source, source, 1.0, 1.0, cpu_softcap.KEEP_NOTHING)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ops.softcap_map(x.double(), None, 1.0, 1.0, cpu_softcap.KEEP_MAPPED)


def _capped_chain(logit_map, raw, upstream, native_map, native_chain, monkeypatch, form):
    """One chunk mapped (`cap_` or `capped_into`) and chained, each step on the extension or on torch's ops."""
    native = native_build.loaded_cpu_ops_for
    monkeypatch.setattr(cpu_softcap, "loaded_cpu_ops_for", native if native_map else lambda *tensors: None)
    kept, out = raw.clone(), torch.empty_like(raw)
    if form == "cap":
        kept.mul_(logit_map.gemm_factor)
        logit_map.cap_(kept, out)
    else:
        logit_map.capped_into(kept, out)
    monkeypatch.setattr(cpu_softcap, "loaded_cpu_ops_for", native if native_chain else lambda *tensors: None)
    grad = upstream.clone()
    if form == "cap":
        logit_map.tanh_chain_(grad, kept)
    else:
        logit_map.chain_(grad, kept)
    return out, grad


@pytest.mark.parametrize("form", ["cap", "capped_into"])
@pytest.mark.parametrize("native_map, native_chain", [(True, True), (True, False), (False, True)])
def test_extension_and_torch_steps_take_turns(ops, monkeypatch, form, native_map, native_chain):
    """Each step leaves what the other path's next step reads: the mapped logits and the gradient agree with an
    all-torch chunk whichever path each step takes (as when a compiled graph or a not yet loaded extension takes
    one of them)."""
    logit_map = LogitMap(scale=0.7, softcap=20.0, temperature=2.0)
    gen = torch.Generator().manual_seed(0)
    raw, upstream = torch.randn(17, 300, generator=gen) * 60, torch.randn(17, 300, generator=gen)
    expected = _capped_chain(logit_map, raw, upstream, False, False, monkeypatch, form)
    found = _capped_chain(logit_map, raw, upstream, native_map, native_chain, monkeypatch, form)
    torch.testing.assert_close(found[0], expected[0], atol=2e-6, rtol=0)
    torch.testing.assert_close(found[1], expected[1], atol=1e-6, rtol=1e-5)
    x64 = (raw.double() * 0.7 / 20.0)
    torch.testing.assert_close(found[1].double(), upstream.double() * 0.35 / torch.cosh(x64) ** 2, atol=1e-6,
                               rtol=1e-5)


def test_apply_in_place_and_the_paths_left_to_torch(ops):
    logit_map = LogitMap(scale=1.5, softcap=30.0)
    raw = torch.randn(5, 700) * 50
    expected = logit_map.reference(raw.double())
    torch.testing.assert_close(logit_map.apply_(raw.clone()).double(), expected, atol=4e-6, rtol=0)
    # Not taken: a strided tensor, a 16-bit one, a partial overlap.
    strided = raw.clone().t()
    assert not cpu_softcap.softcap_into(strided, torch.empty_like(strided), 1.0, 1.0, keep_tanh=False)
    assert not cpu_softcap.softcap_into(raw.bfloat16(), torch.empty(5, 700, dtype=torch.bfloat16), 1.0, 1.0, False)
    flat = raw.clone().view(-1)
    assert not cpu_softcap.softcap_into(flat[:2000], flat[1000:3000], 1.0, 1.0, keep_tanh=False)
    assert not cpu_softcap.softcap_chain_(flat[:2000], flat[1000:3000], 1.0, 1.0, from_tanh=True)


def test_the_map_starts_no_build(monkeypatch):
    """Glue takes the extension only once a kernel call has loaded it."""
    monkeypatch.setattr(native_build, "cpu_extension_if_loaded", lambda: None)
    x = torch.randn(4, 64)
    assert not cpu_softcap.softcap_into(x, torch.empty_like(x), 1.0, 1.0, keep_tanh=False)
