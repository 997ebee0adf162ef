"""The quality harness: its metrics, and one tiny run on the toy models through real ComfyUI."""
from __future__ import annotations

import json
import math

import pytest
import torch

from chipmunk_pack.lab import quality


def test_psnr_and_ssim_of_identical_and_different_pictures():
    a = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    assert quality.psnr(a, a) == quality.PSNR_CAP
    assert quality.ssim(a, a) == pytest.approx(1.0)
    b = (a + 0.1).clamp(0, 1)
    assert 15 < quality.psnr(a, b) < 30
    assert quality.ssim(a, b) < 1.0
    assert quality.psnr(a, torch.rand_like(a)) < quality.psnr(a, b)


def test_fraction_explaining():
    concentrated = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    uniform = torch.ones(1, 10)
    assert [f.item() for f in quality.fraction_explaining(concentrated)] == [0.25, 0.25]
    assert [round(f.item(), 3) for f in quality.fraction_explaining(uniform)] == [0.7, 0.9]
    skewed = torch.tensor([[6.0, 2.0, 1.0, 1.0]])  # 60% in one value, 80% in two, 90% in three
    assert [f.item() for f in quality.fraction_explaining(skewed)] == [0.5, 0.75]


def test_settings_parse_into_chipmunk_and_sampler_fields():
    assert quality.parse_setting("dense").chipmunk is None
    assert quality.parse_setting("default").chipmunk == {}
    s = quality.parse_setting("attention_sparsity=0.9,query_group=128,local_window=4x6x8,steps=14")
    assert s.chipmunk == {"attention_sparsity": 0.9, "query_group": 128, "local_window": (4, 6, 8)}
    assert s.sampler == {"steps": 14}
    assert quality.parse_setting("steps=14").chipmunk is None


def test_easycache_and_equal_cost_settings():
    alone = quality.parse_setting("easycache")
    assert alone.easycache and alone.chipmunk is None
    both = quality.parse_setting("default,easycache=1")
    assert both.easycache and both.chipmunk == {}
    tuned = quality.parse_setting("attention_sparsity=0.9,easycache=1")
    assert tuned.easycache and tuned.chipmunk == {"attention_sparsity": 0.9}
    assert not quality.parse_setting("attention_sparsity=0.9").easycache
    baseline = quality.equal_cost_setting("default", 1.47, 20)
    assert baseline.chipmunk is None and baseline.sampler == {"steps": 14}
    assert baseline.name == "steps=14 (equal cost of default, 1.47x)"


def test_frechet_distance_of_feature_sets():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(64, 8, generator=generator)
    assert quality.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = quality.frechet_distance(a + 1.0, a)
    assert shifted == pytest.approx(8.0, rel=1e-6)  # the means move by 1 in each of 8 dimensions
    wider = quality.frechet_distance(2.0 * a, a)
    assert wider > 0 and quality.frechet_distance(a, 2.0 * a) == pytest.approx(wider, rel=1e-6)


@pytest.mark.comfyui
def test_tiny_quality_run(toy_models, tmp_path):
    out = tmp_path / "quality.json"
    quality.main(["--tiny", "--models", str(toy_models), "--settings", "default", "steps=2", "easycache",
                  "--equal-cost", "default=2", "--out", str(out)])
    results = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text().count("| dense |") == 2
    for family in ("flux", "wan"):
        rows = results["families"][family]["settings"]
        assert rows["dense"]["psnr_db"] == quality.PSNR_CAP and rows["dense"]["ssim"] == 1.0
        assert rows["steps=2"]["psnr_db"] < quality.PSNR_CAP  # half the steps: a different picture
        assert rows["steps=2"]["ssim"] <= 1.0
        assert rows["dense"]["feature_distance"] == 0.0
        assert "easycache" in rows and "steps=2 (equal cost of default, 2x)" in rows, list(rows)
        for row in rows.values():
            assert 0.0 <= row["classifier_accuracy"] <= 1.0
            assert math.isfinite(row["psnr_db"]) and math.isfinite(row["feature_distance"])
        structure = results["families"][family]["structure"]
        for key, value in structure.items():
            assert 0.0 < value <= 1.0, key
        assert structure["attention_fraction_for_70"] <= structure["attention_fraction_for_90"]
