"""`adamw_bf16` (`job.train.optimizers.AdamWBF16`): the update function against a plain per-op
reference, torch's AdamW on fp32 weights, the counter-based rounding noise (pure, uniform, unbiased),
resuming from a state dict, subsets of parameters stepped apart, and the compiled update."""

from __future__ import annotations

import io
import logging
import math

import pytest
import torch

from job.train import optimizers as O
from job.train.optimizers import AdamWBF16, adamw_update_, hyper_row, mix32, rounding_key, rounding_noise, stochastic_round_

KW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


def _params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 33), (7,), (3, 5, 2, 2), (1000,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    params.append(torch.nn.Parameter(torch.randn(6, 4, generator=g).to(dtype).t()))  # not contiguous
    assert not params[-1].is_contiguous()
    return params


def _clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _grads(params, step: int):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


class ReferenceLoop:
    """The update spelled out op by op with Python scalars (as the optimizer was written before the
    fused path), drawing the same counter-based noise: what `adamw_update_` must compute."""

    def __init__(self, params, lr, betas, eps, weight_decay, seed=0):
        self.params, self.lr, self.betas, self.eps, self.wd, self.seed = params, lr, betas, eps, weight_decay, seed
        self.state = {}

    @torch.no_grad()
    def step(self):
        beta1, beta2 = self.betas
        for index, p in enumerate(self.params):
            st = self.state.setdefault(index, {"step": 0, "m": torch.zeros(p.shape), "v": torch.zeros(p.shape)})
            st["step"] += 1
            step = st["step"]
            grad = p.grad.float()
            st["m"].lerp_(grad, 1 - beta1)
            st["v"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (st["v"].sqrt() / math.sqrt(1 - beta2 ** step)).add_(self.eps)
            weights = p.float().mul_(1 - self.lr * self.wd)
            weights.addcdiv_(st["m"], denom, value=-self.lr / (1 - beta1 ** step))
            if p.dtype == torch.bfloat16:
                rounded = torch.empty(p.numel(), dtype=torch.bfloat16)
                stochastic_round_(rounded, weights.reshape(-1), torch.tensor(rounding_key(self.seed, step, index)))
                p.copy_(rounded.view(p.shape))
            else:
                p.copy_(weights)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_update_matches_the_reference_loop_bit_for_bit(dtype):
    params = _params(dtype)
    ref_params = _clone(params)
    opt, ref = AdamWBF16(params, seed=3, **KW), ReferenceLoop(ref_params, seed=3, **KW)
    for step in range(4):
        _grads(params, step)
        _grads(ref_params, step)
        opt.step()
        ref.step()
    for index, (p, r) in enumerate(zip(params, ref_params)):
        assert p.dtype == dtype and torch.equal(p, r), index
        assert torch.equal(opt.state[p]["exp_avg"], ref.state[index]["m"])
        assert torch.equal(opt.state[p]["exp_avg_sq"], ref.state[index]["v"])
    assert any(not torch.equal(p, q) for p, q in zip(params, _params(dtype)))  # it did move


def test_fp32_weights_get_torch_adamw_exactly():
    params = _params(torch.float32)
    torch_params = _clone(params)
    opt = AdamWBF16(params, **KW)
    ref = torch.optim.AdamW(torch_params, foreach=False, **KW)
    for step in range(5):
        for o in (opt, ref):  # a changing learning rate, as a scheduler sets it
            o.param_groups[0]["lr"] = KW["lr"] * (step + 1) / 5
        _grads(params, step)
        _grads(torch_params, step)
        opt.step()
        ref.step()
    for p, q in zip(params, torch_params):
        assert torch.equal(p, q)


def test_mix32_is_the_same_on_python_ints_and_tensors_and_a_bijection():
    values = [0, 1, 2, 12345, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1]
    values += torch.randint(0, 2 ** 32, (2000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64).tolist()
    tensor = O._mix32_(torch.tensor(values, dtype=torch.int64))
    assert tensor.tolist() == [mix32(v) for v in values]
    assert all(0 <= v < 2 ** 32 for v in tensor.tolist())
    consecutive = O._mix32_(torch.arange(1 << 16, dtype=torch.int64))
    assert consecutive.unique().numel() == 1 << 16  # no collisions


def test_rounding_noise_is_the_hash_of_the_element_index():
    key = rounding_key(1, 2, 3)
    n = O.CPU_NOISE_CHUNK * 2 + 12345  # the eager CPU path works in pieces: their seams must not show
    noise = rounding_noise(n, torch.tensor(key), torch.device("cpu"))
    for i in [0, 1, O.CPU_NOISE_CHUNK - 1, O.CPU_NOISE_CHUNK, O.CPU_NOISE_CHUNK + 1, n - 1, 77777, 400_001]:
        assert int(noise[i]) == mix32(i ^ key) >> 16, i
    small = rounding_noise(1000, torch.tensor(key), torch.device("cpu"))  # one piece
    assert torch.equal(small, noise[:1000])


def test_rounding_noise_is_uniform_and_keyed():
    key = torch.tensor(rounding_key(0, 1, 0))
    noise = rounding_noise(1 << 20, key, torch.device("cpu"))
    assert noise.dtype == torch.int32 and int(noise.min()) >= 0 and int(noise.max()) < 1 << 16
    counts = torch.bincount(noise >> 12, minlength=16).double()  # 16 bins of the top bits
    expected = noise.numel() / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 50, chi2  # 15 degrees of freedom: 50 is far out in the tail (p ~ 1e-5)
    assert float((noise & 1).double().mean()) == pytest.approx(0.5, abs=0.005)  # the low bit too
    assert torch.equal(noise, rounding_noise(1 << 20, key, torch.device("cpu")))  # a pure function
    keys = {rounding_key(s, t, i) for s in (0, 1) for t in (1, 2, 3) for i in (0, 1, 495)}
    assert len(keys) == 18  # seed, step and parameter each change the key
    other = rounding_noise(1 << 20, torch.tensor(rounding_key(0, 2, 0)), torch.device("cpu"))
    assert float((noise == other).double().mean()) < 0.001  # another step: other noise (chance: 1/65536)


@pytest.mark.parametrize("value", [1.0 + 2 ** -10, 1.0 + 2 ** -8, 1.0 + 7 * 2 ** -10, -3.3, 1e-20, 123456.789])
def test_stochastic_rounding_is_unbiased(value):
    n = 1 << 20
    source = torch.full((n,), value)
    out = torch.empty(n, dtype=torch.bfloat16)
    stochastic_round_(out, source, torch.tensor(rounding_key(7, 1, 0)))
    values = out.float().unique()
    assert values.numel() <= 2  # only the two bf16 neighbours of the value
    f32 = torch.tensor(value, dtype=torch.float32).item()
    ulp = abs(float(values.max() - values.min())) if values.numel() == 2 else 0.0
    p_up = (f32 - float(values.min())) / ulp if ulp else 0.0
    sigma = ulp * math.sqrt(max(p_up * (1 - p_up), 1e-12) / n)
    assert out.double().mean().item() == pytest.approx(f32, abs=5 * sigma + 1e-12 * abs(f32))


def test_small_updates_survive_in_expectation():
    # each update is an eighth of a bf16 ulp of 1.0: round to nearest would lose them all
    w = torch.nn.Parameter(torch.ones(20_000, dtype=torch.bfloat16))
    opt = AdamWBF16([w], lr=1e-4, seed=0)
    for _ in range(20):
        w.grad = torch.ones_like(w)
        opt.step()
    assert w.float().mean().item() == pytest.approx(1.0 - 20 * 1e-4, abs=2e-4)


def _save_load(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_resume_from_state_dict_continues_the_identical_sequence():
    straight = _params(torch.bfloat16)
    resumed = _clone(straight)
    opt = AdamWBF16(straight, seed=5, **KW)
    first = AdamWBF16(resumed, seed=5, **KW)
    for step in range(3):
        _grads(straight, step)
        _grads(resumed, step)
        opt.step()
        first.step()
    state = _save_load(first.state_dict())
    assert "sr_generators" not in state
    del first
    second = AdamWBF16(resumed, seed=5, **KW)  # a new process: a new optimizer over the restored weights
    second.load_state_dict(state)
    assert all(second.state[p]["exp_avg"].dtype == torch.float32 for p in resumed)
    for step in range(3, 6):
        _grads(straight, step)
        _grads(resumed, step)
        opt.step()
        second.step()
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg_sq"], second.state[q]["exp_avg_sq"])


def test_old_state_dicts_with_generator_states_still_load(caplog):
    params = _params(torch.bfloat16)
    opt = AdamWBF16(params, **KW)
    _grads(params, 0)
    opt.step()
    state = opt.state_dict()
    state["sr_generators"] = {"cpu": torch.Generator().get_state()}  # as the earlier version saved them
    fresh = AdamWBF16(_clone(params), **KW)
    with caplog.at_level(logging.DEBUG, logger="trainer.train"):
        fresh.load_state_dict(state)
    assert any("ignoring the saved rounding generators" in r.getMessage() for r in caplog.records)
    assert fresh.state_dict()["state"][0]["step"] == 1


def test_stepping_subsets_of_the_parameters_draws_the_same_noise():
    # the group offload's background step (job.train.offload) calls step() with param_groups cut down
    whole = _params(torch.bfloat16)
    parts = _clone(whole)
    opt, split = AdamWBF16(whole, **KW), AdamWBF16(parts, **KW)
    _grads(whole, 0)
    _grads(parts, 0)
    opt.step()
    full_groups = split.param_groups
    for subset in (parts[3:], parts[:3]):
        split.param_groups = [dict(full_groups[0], params=subset)]
        split.step()
    split.param_groups = full_groups
    for p, q in zip(whole, parts):
        assert torch.equal(p, q)


def test_a_failing_compiled_update_falls_back_to_the_eager_one(monkeypatch, caplog):
    params = _params(torch.bfloat16)
    reference = _clone(params)
    opt, ref = AdamWBF16(params, fused=True, **KW), AdamWBF16(reference, fused=False, **KW)

    def broken(*args):
        raise RuntimeError("no working triton here")

    monkeypatch.setattr(O, "compiled_adamw_update_many", lambda: broken)
    _grads(params, 0)
    _grads(reference, 0)
    opt.step()
    ref.step()
    assert "using the eager update" in caplog.text and opt._fused is False
    assert all(torch.equal(p, q) for p, q in zip(params, reference))


def test_the_list_update_is_the_per_tensor_update():
    params = _params(torch.bfloat16)
    reference = _clone(params)
    flat = [p.detach().reshape(-1).clone() for p in params]
    ref_flat = [p.detach().reshape(-1).clone() for p in reference]
    grads = [torch.randn(p.numel()).bfloat16() for p in params]
    moments = [[torch.zeros(p.numel()) for p in params] for _ in range(4)]
    hyper = torch.tensor([hyper_row(KW, 1)] * len(params), dtype=torch.float32)
    keys = torch.arange(len(params))
    O.adamw_update_many_(flat, grads, moments[0], moments[1], hyper, keys)
    for i in range(len(params)):
        adamw_update_(ref_flat[i], grads[i], moments[2][i], moments[3][i], hyper[i], keys[i])
    assert all(torch.equal(a, b) for a, b in zip(flat, ref_flat))
    assert all(torch.equal(a, b) for a, b in zip(moments[1], moments[3]))


@pytest.mark.slow
def test_compiled_chunked_update_matches_the_eager_one(monkeypatch):
    """The path CUDA takes (compiled chunks, padded with scratch tensors), compiled here by inductor's
    CPU backend (~30 s): close to the eager reference, one graph for every chunk."""
    monkeypatch.setattr(O, "FUSED_CHUNK", 4)
    monkeypatch.setattr(O, "_compiled_many", None)
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    for dtype in (torch.bfloat16, torch.float32):
        params = _params(dtype) + [torch.nn.Parameter(torch.randn(100_003).to(dtype))]  # 6 tensors: 2 chunks, 2 padded
        reference = _clone(params)
        compiled, eager = AdamWBF16(params, fused=True, **KW), AdamWBF16(reference, fused=False, **KW)
        for step in range(4):
            if step == 2:  # new state tensors (a resume): the compiled path must not keep using the old ones
                for opt in (compiled, eager):
                    opt.load_state_dict(_save_load(opt.state_dict()))
            _grads(params, step)
            _grads(reference, step)
            compiled.step()
            eager.step()
        assert compiled._fused is True and compiled._compiled_ok == {(dtype, dtype)}
        for p, q in zip(params, reference):
            m, me = compiled.state[p]["exp_avg"], eager.state[q]["exp_avg"]
            v, ve = compiled.state[p]["exp_avg_sq"], eager.state[q]["exp_avg_sq"]
            # fp32 rounding differences (inductor's lerp and fused multiply-adds), not algorithmic ones
            assert float((m - me).norm() / me.norm()) < 1e-6 and float((v - ve).norm() / ve.norm()) < 1e-6
            if dtype == torch.bfloat16:  # same noise: only a 1-ulp fp32 difference at a rounding edge can differ
                assert float((p != q).double().mean()) < 1e-3
                assert torch.allclose(p.float(), q.float(), rtol=2 ** -7, atol=0)
            else:
                assert float((p - q).norm() / q.norm()) < 1e-6
    assert counters["stats"]["unique_graphs"] - graphs_before == 2  # one per dtype, whatever the sizes


def test_float32_weights_through_torchs_fused_kernel_match_the_eager_update_and_resume():
    """What CUDA does with float32 weights (LoRA adapters): torch's fused AdamW kernel, forced here on the
    CPU. Same update as the eager reference up to fp32 rounding order, the same int steps in the state
    dict, and a resume from that state dict (in either direction) carries on as one run."""
    params = _params(torch.float32)
    reference = _clone(params)
    bf16 = _params(torch.bfloat16, seed=1)  # a bf16 parameter in the same optimizer keeps the rounding path
    bf16_reference = _clone(bf16)
    fused = AdamWBF16(params + bf16, torch_fused_fp32=True, fused=False, **KW)
    eager = AdamWBF16(reference + bf16_reference, torch_fused_fp32=False, fused=False, **KW)
    calls = []
    original = torch._fused_adamw_
    try:
        torch._fused_adamw_ = lambda *a, **k: (calls.append(len(a[0])), original(*a, **k))[1]
        for step in range(4):
            if step == 2:  # resume: each optimizer loads the other's state
                fused_state, eager_state = _save_load(fused.state_dict()), _save_load(eager.state_dict())
                fused.load_state_dict(eager_state)
                eager.load_state_dict(fused_state)
            _grads(params + bf16, step)
            _grads(reference + bf16_reference, step)
            fused.step()
            eager.step()
    finally:
        torch._fused_adamw_ = original
    assert calls == [len(params) - 1] * 4  # the contiguous float32 weights, in one call per step
    assert fused.state[params[0]]["step"] == 4 and isinstance(fused.state[params[0]]["step"], int)
    for p, q, start in zip(params, reference, _params(torch.float32)):
        assert float((p - q).norm() / q.norm()) < 1e-6
        assert not torch.equal(p, start)  # they moved
    assert all(torch.equal(p, q) for p, q in zip(bf16, bf16_reference))
