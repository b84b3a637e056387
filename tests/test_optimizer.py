"""ZeroAdamW in one process with no process group: parity, API semantics and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from zero_adam import ZeroAdamW

from _models import batch, loss_fn, make_model
from _parity import run_parity


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("extra", [{}, {"clip": 0.05, "accum": 2}, {"dtype": "bf16", "accum": 2}])
def test_parity_without_process_group(stage, extra):
    r = run_parity(dict(stage=stage, **extra))
    assert r["master"] < 1e-6 and r["norm_rel"] < 1e-6, r
    assert r["reduce_calls"] == [0] * 10, "one rank must not call collectives"


@pytest.mark.parametrize("kw", [dict(amsgrad=True), dict(maximize=True), dict(weight_decay=0.0)])
def test_adamw_variants_match_torch(kw):
    model = make_model()
    ref = copy.deepcopy(model)
    opt = ZeroAdamW(model.parameters(), lr=1e-2, **kw)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, **kw)
    for step in range(6):
        x, y = batch(step, 8)
        for m, o in ((model, opt), (ref, ref_opt)):
            loss_fn(m, x, y).backward()
            o.step()
            o.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_closure_and_grad_norm():
    model, x, y = make_model(), *batch(0, 8)
    ref = copy.deepcopy(model)
    opt = ZeroAdamW(model.parameters())

    def closure():
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    loss_fn(ref, x, y).backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf"))
    assert torch.equal(loss, loss_fn(ref, x, y).detach())
    assert abs(opt.last_grad_norm - float(norm)) < 1e-6 * float(norm)
    assert all(p.grad is None for p in model.parameters())


def test_zero_grad_discards_accumulated_gradient():
    a, b = make_model(), make_model()
    oa, ob = ZeroAdamW(a.parameters()), ZeroAdamW(b.parameters())
    x, y = batch(0, 8)
    x2, y2 = batch(1, 8)
    loss_fn(a, x2, y2).backward()
    oa.zero_grad()
    loss_fn(a, x, y).backward()
    oa.step()
    loss_fn(b, x, y).backward()
    ob.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_param_dtype_casts_model_and_keeps_exact_master():
    model = make_model()
    orig = [p.detach().clone() for p in model.parameters()]
    opt = ZeroAdamW(model.parameters(), param_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for fb in opt.buckets:
        expected = torch.cat([orig[s.param].reshape(-1) for s in fb.bucket.slots])
        assert fb.master.dtype == torch.float32
        assert torch.equal(fb.master[:expected.numel()], expected), "master must be the fp32 original"
    from zero_adam.kernel import round_to_bf16
    for p, o in zip(model.parameters(), orig):
        assert torch.equal(p, round_to_bf16(o.reshape(-1)).view(o.shape))


def test_frozen_params_stay_out_and_unchanged():
    model = make_model()
    model.inp.requires_grad_(False)
    frozen = model.inp.weight.detach().clone()
    opt = ZeroAdamW(model.named_parameters(), lr=0.1)
    assert {s.key for s in opt.plan.params} == {n for n, p in model.named_parameters() if p.requires_grad}
    assert "inp.weight" not in {s.key for s in opt.plan.params}
    loss_fn(model, *batch(0, 8)).backward()
    opt.step()
    assert torch.equal(model.inp.weight, frozen)


def test_named_parameters_name_the_plan():
    model = make_model()
    opt = ZeroAdamW(model.named_parameters())
    assert {s.key for s in opt.plan.params} == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("kw,match", [
    (dict(lr=-1.0), "Invalid learning rate"),
    (dict(betas=(1.0, 0.9)), "beta parameter at index 0"),
    (dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
    (dict(eps=-1e-8), "Invalid epsilon"),
    (dict(weight_decay=-0.1), "Invalid weight_decay"),
    (dict(stage=3), "stage=3"),
    (dict(bucket_mb=0), "bucket_mb=0"),
    (dict(stage=1, accumulate="shard"), "needs stage=2"),
    (dict(accumulate="sometimes"), "accumulate='sometimes'"),
    (dict(reduce_dtype=torch.int32), "reduce_dtype"),
    (dict(param_dtype="bf16"), "param_dtype"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
    (dict(capturable=True), "capturable"),
    (dict(reduce_collective="fast"), "reduce_collective"),
])
def test_invalid_arguments_fail_before_touching_the_model(kw, match):
    model = make_model()
    ptrs = [p.data_ptr() for p in model.parameters()]
    with pytest.raises((ValueError, TypeError), match=match):
        ZeroAdamW(model.parameters(), **kw)
    assert ptrs == [p.data_ptr() for p in model.parameters()], "a failed construction changed the model"


def test_invalid_group_hyperparameter_names_the_group():
    model = make_model()
    with pytest.raises(ValueError, match="param group 1"):
        ZeroAdamW([{"params": [model.inp.weight]}, {"params": [model.out.weight], "lr": -3.0}])


def test_parameter_problems():
    with pytest.raises(ValueError, match="no trainable"):
        ZeroAdamW([nn.Parameter(torch.ones(3), requires_grad=False)])
    p = nn.Parameter(torch.ones(3))
    with pytest.warns(UserWarning, match="duplicate"), pytest.raises(ValueError, match="listed twice"):
        ZeroAdamW([p, p])
    with pytest.raises(ValueError, match="different devices"):
        ZeroAdamW([nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3, device="meta"))])
    with pytest.raises(TypeError, match="dtype"):
        ZeroAdamW([nn.Parameter(torch.ones(3, dtype=torch.complex64))])


def test_sparse_gradient_is_refused():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = ZeroAdamW(emb.parameters())  # noqa: F841 (the hooks live as long as the optimizer)
    with pytest.raises(ValueError, match="sparse"):
        emb(torch.tensor([1, 2])).sum().backward()


def test_step_inside_no_sync_and_param_groups_between_backward_and_step_are_refused():
    model = make_model()
    opt = ZeroAdamW(model.parameters())
    with opt.no_sync():
        loss_fn(model, *batch(0, 4)).backward()
        with pytest.raises(RuntimeError, match="inside opt.no_sync"):
            opt.step()
    with pytest.raises(RuntimeError, match="between backward and step"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))]})
    opt.step()
    extra = nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.5


def test_moving_the_model_after_construction_is_detected():
    model = make_model()
    opt = ZeroAdamW(model.parameters())
    model.double()
    loss = model(batch(0, 4)[0].double()).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="moved, cast or replaced"):
        opt.step()


def test_load_state_dict_from_elsewhere_is_refused():
    model = make_model()
    opt = ZeroAdamW(model.parameters())
    with pytest.raises(ValueError, match="not saved by ZeroAdamW"):
        opt.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


def test_clip_grad_norm_on_the_model_warns_once_and_opt_clip_is_the_fix():
    """The DDP idiom silently clips nothing under ZeroAdamW (param.grad is None): warned once per
    optimizer, at the caller's line; parameters not owned by a live ZeroAdamW (a DDP model, a
    closed optimizer) are left to torch's function untouched."""
    model = make_model()
    opt = ZeroAdamW(model.parameters(), lr=1e-2)
    x, y = batch(0, 8)
    loss_fn(model, x, y).backward()
    with pytest.warns(UserWarning, match=r"opt.clip_grad_norm_\(max_norm\)") as caught:
        assert torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item() == 0.0
    assert caught[0].filename == __file__
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)       # once only
        assert opt.clip_grad_norm_(1.0).item() > 0.0
        plain = make_model()
        loss_fn(plain, x, y).backward()
        assert torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0).item() > 0.0
        opt.close()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)       # owner closed: no warning
    again = ZeroAdamW(model.parameters(), lr=1e-2)                     # a new optimizer warns again
    loss_fn(model, x, y).backward()
    with pytest.warns(UserWarning, match="clipped nothing"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    again.close()
