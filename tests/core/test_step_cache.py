"""The step-cache schedules, and the residual a skipped step applies (no ComfyUI needed)."""

import pytest
import torch

from chipmunk_pack.chipmunk_core.config import resolve_config
from chipmunk_pack.chipmunk_core.schedule import DenseSchedule
from chipmunk_pack.chipmunk_core.step_cache import MIN_STEPS, StepCache, StepCacheSchedule


def _schedule(family, steps, mode="fixed", **settings):
    config = resolve_config(family, step_cache=mode, **settings)
    dense = DenseSchedule(config, steps)
    return config, dense, StepCacheSchedule(config, steps, dense)


# Skipped steps of the fixed schedule at the families' reference dense steps.
@pytest.mark.parametrize("family,steps,skipped", [
    ("flux", 50, 23), ("flux", 28, 12), ("flux", 20, 8), ("flux", 8, 0),
    ("wan", 50, 23), ("wan", 28, 12), ("wan", 20, 8), ("wan", 8, 0),
    ("hunyuan_video", 50, 23), ("hunyuan_video", 28, 12), ("hunyuan_video", 20, 8), ("hunyuan_video", 8, 0),
])
def test_fixed_schedule_skips_about_half_the_steps_between_refreshes(family, steps, skipped):
    _, dense, schedule = _schedule(family, steps)
    decisions = [schedule.decide(step, lambda: pytest.fail("fixed schedules measure nothing")) for step in range(steps)]
    assert sum(decisions) == skipped
    for step, skip in enumerate(decisions):
        if skip:
            assert not dense.is_dense(step), "a dense refresh step is never skipped"
            assert step != steps - 1, "the last step is never skipped"
            assert not decisions[step - 1], "never two skips in a row"


def test_few_step_runs_turn_step_caching_off_with_a_reason():
    _, _, schedule = _schedule("flux", MIN_STEPS - 1)
    assert not schedule.active and "at least" in schedule.disabled_reason
    _, _, schedule = _schedule("flux", MIN_STEPS)
    assert schedule.active and schedule.disabled_reason is None


def test_off_never_skips():
    _, _, schedule = _schedule("flux", 50, mode="off")
    assert not any(schedule.decide(step, lambda: True) for step in range(50))


def test_a_step_is_decided_once_for_every_conditioning():
    _, _, schedule = _schedule("flux", 30, mode="adaptive")
    answers = iter([True, False])
    first = schedule.decide(5, lambda: next(answers))
    assert schedule.decide(5, lambda: pytest.fail("decided already")) == first


def test_adaptive_skips_while_the_predicted_change_stays_under_the_threshold():
    cache = StepCache()
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 16, 8, generator=generator)
    for step, scale in enumerate((1.0, 0.9)):  # two computed steps: the rate becomes known
        x = x0 * scale
        cache.begin_computed({"img": x})
        cache.end_computed({"img": x * 2})
    assert cache.rate == pytest.approx(1.0)
    rows = slice(0, 1)
    assert cache.predict_skip(x0 * 0.89, rows, threshold=0.05, max_skips=2)  # ~1% change predicted
    cache.apply({"img": x0})
    assert not cache.predict_skip(x0 * 0.5, rows, threshold=0.05, max_skips=2)  # a big change: compute
    cache.skips_in_a_row = 2
    assert not cache.predict_skip(x0 * 0.899, rows, threshold=0.05, max_skips=2)  # the cap


def test_a_skipped_step_applies_the_last_computed_residual_per_stream():
    cache = StepCache()
    img, txt = torch.randn(2, 5, 4), torch.randn(2, 3, 4)
    cache.begin_computed({"img": img, "txt": txt})
    img += 1  # blocks update their inputs in place: the cache kept copies
    cache.end_computed({"img": img * 3, "txt": txt - 2})
    new_img, new_txt = torch.randn(2, 5, 4), torch.randn(2, 3, 4)
    out = cache.apply({"img": new_img, "txt": new_txt})
    torch.testing.assert_close(out["img"], new_img + (img * 3 - (img - 1)))
    torch.testing.assert_close(out["txt"], new_txt - 2)
    assert cache.ready_for({"img": new_img, "txt": new_txt})
    assert not cache.ready_for({"img": torch.randn(1, 5, 4), "txt": new_txt})
