"""Loss scaling and the skip decision, as pure state machines."""

from __future__ import annotations

import math

import pytest

from zero_adam.scaler import LossScaleConfig, LossScaler, decide, make_scaler


def test_dynamic_scale_backs_off_with_hysteresis_and_grows_after_an_interval():
    s = LossScaler(LossScaleConfig(init_scale=1024, hysteresis=2, growth_interval=3, min_scale=128))
    assert s.update(True) and s.scale == 1024, "first overflow: skipped, scale kept (hysteresis 2)"
    assert s.update(True) and s.scale == 512, "second in a row: backs off"
    assert not s.update(False) and not s.update(False) and s.scale == 512
    assert not s.update(False) and s.scale == 1024, "grows after 3 clean steps"
    for _ in range(10):
        s.update(True)
    assert s.scale == 128, "never below min_scale"
    assert s.skipped == 12
    state = s.state_dict()
    t = LossScaler(s.config)
    t.load_state_dict(state)
    assert t.state_dict() == state


def test_static_scale_skips_but_never_changes():
    s = make_scaler(8.0)
    assert s.update(True) and s.update(True) and not s.update(False) and s.scale == 8.0


def test_decide_unscales_and_clips_in_one_factor():
    s = LossScaler(LossScaleConfig(init_scale=4.0))
    d = decide(40.0, scaler=s, max_grad_norm=1.0)
    assert not d.skip and d.norm == 10.0 and d.multiplier == pytest.approx(1.0 / (10.0 + 1e-6) / 4.0)
    d = decide(math.inf, scaler=s, max_grad_norm=1.0)
    assert d.skip
    assert decide(math.nan, scaler=None, max_grad_norm=None).skip
    assert decide(3.0, scaler=None, max_grad_norm=None).multiplier == 1.0


@pytest.mark.parametrize("kw,match", [
    (dict(init_scale=0), "init_scale"), (dict(growth_factor=1), "growth"),
    (dict(backoff_factor=1.5), "backoff"), (dict(hysteresis=0), "hysteresis"),
    (dict(min_scale=1e9), "min_scale")])
def test_bad_loss_scale_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        LossScaleConfig(**kw)


def test_make_scaler_rejects_nonsense():
    with pytest.raises(ValueError, match="loss_scale='sometimes'"):
        make_scaler("sometimes")
    assert make_scaler(None) is None and make_scaler("dynamic").scale == 2.0 ** 16
