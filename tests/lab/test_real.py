"""The real-scale lab models: rich scenes, their configurations through ComfyUI's stock loader in
fp8, and the training command at toy sizes on the CPU (resume and install included)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chipmunk_pack.lab import data, rich, scenes, vocab


def _atlas(text=True):
    rng = np.random.default_rng(0)
    sprites = rng.integers(0, 255, (len(vocab.CLASSES), 64, 64, 4), dtype=np.uint8)
    sprites[..., 3] = 255
    lines = data.render_text_lines(None, count=6) if text else None
    return rich.Atlas(sprites, None if lines is None else (lines["text"], lines["text_widths"]))


def test_text_lines_are_rendered_from_a_font():
    lines = data.render_text_lines(None, count=5)
    assert lines["text"].shape == (5, data.TEXT_HEIGHT, data.TEXT_WIDTH) and lines["text"].dtype == np.uint8
    assert (lines["text"].reshape(5, -1).max(1) == 255).all()  # every line has ink
    assert ((lines["text_widths"] > 10) & (lines["text_widths"] <= data.TEXT_WIDTH)).all()
    again = data.render_text_lines(None, count=5)
    assert np.array_equal(lines["text"], again["text"])


def test_data_file_keeps_text_lines(tmp_path):
    out = tmp_path / "sprites.npz"
    arrays = {"sprites": np.zeros((len(vocab.CLASSES), 64, 64, 4), np.uint8),
              "meta": np.frombuffer(json.dumps({"classes": [{"word": w} for w in vocab.CLASS_WORDS]}).encode(), np.uint8)}
    data.save(arrays, out)
    assert data.load_text(out) is None
    arrays.update(data.render_text_lines(None, count=3))
    data.save(arrays, out)
    text, widths = data.load_text(out)
    assert text.shape[0] == 3 and widths.shape == (3,)


def test_rich_pictures_are_detailed_and_keep_the_prompt():
    atlas = _atlas()
    placement, extras, words = rich.random_images(3, torch.Generator().manual_seed(0), atlas, 96, 64)
    assert len(extras.others) >= rich.OTHERS[0]
    pictures = rich.render(atlas, placement, extras, 96, 64)
    assert pictures.shape == (3, 3, 96, 64) and 0.0 <= pictures.min() and pictures.max() <= 1.0
    assert [vocab.CLASS_WORDS[c] for c in placement.cls.tolist()] == [w[1] for w in words]
    for layer in extras.others:  # the prompt's object is not among the others
        assert (layer.index != placement.cls).all()
    again = rich.render(atlas, *rich.random_images(3, torch.Generator().manual_seed(0), atlas, 96, 64)[:2], 96, 64)
    assert torch.equal(pictures, again)
    # Texture: far more variation than the toy's plain backgrounds.
    plain = scenes.render(atlas.emoji, placement, 64)
    assert pictures.std(dim=(-2, -1)).mean() > 0.5 * plain.std(dim=(-2, -1)).mean()


def test_the_main_object_is_drawn_on_top():
    atlas = _atlas(text=False)
    atlas.emoji[:] = 0.0
    atlas.emoji[:, 3] = 1.0  # opaque black squares...
    atlas.emoji[5, 0] = 1.0  # ...except class 5: red
    placement, extras, _ = rich.random_images(1, torch.Generator().manual_seed(1), atlas, 64, 64)
    placement.cls[:] = 5
    placement.cx[:], placement.cy[:], placement.size[:] = 0.5, 0.5, 0.5
    picture = rich.render(atlas, placement, extras, 64, 64)[0]
    assert torch.allclose(picture[:, 32, 32], torch.tensor([1.0, 0.0, 0.0]))


def test_rich_clips_pan_and_move():
    atlas = _atlas()
    placement, extras, words = rich.random_clips(2, 5, torch.Generator().manual_seed(2), atlas)
    assert extras.pan.shape == (2, 2) and extras.other_velocity.shape == (2, len(extras.others), 2)
    extras.pan[:] = torch.tensor([0.3, 0.0])
    clips = rich.render_clips(atlas, placement, extras, 5, 32, 48)
    assert clips.shape == (2, 3, 5, 32, 48)
    assert (clips[:, :, 0] - clips[:, :, -1]).abs().mean() > 0.01  # the camera moved
    assert all(len(w) == 6 for w in words)




def _save_random(family, path, seed=0):
    from chipmunk_pack.lab import networks

    torch.manual_seed(seed)
    model = networks.build(family, scale="real")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.03)
    networks.save_checkpoint(model, path, dtype=networks.FP8)
    return model


def _check_loaded(family, model, path, folder):
    """UNETLoader (weight_dtype default) loads the fp8 file and computes what the fp8-rounded model does."""
    import folder_paths
    import nodes

    from chipmunk_pack.lab import networks

    folder_paths.add_model_folder_path("diffusion_models", str(folder), is_default=True)
    (patcher,) = nodes.UNETLoader().load_unet(path.name, "default")
    detected = patcher.model.model_config.unet_config
    expected = networks.UNET_CONFIGS[family, "real"]
    for key, value in expected.items():
        if key in detected:
            assert detected[key] == value or tuple(detected[key]) == tuple(value), key
    context, pooled, _ = vocab.encode("a large cat at the middle center on a blue gradient", family)
    context = torch.from_numpy(context)[None]
    x = torch.randn((1, 16, 8, 8) if family == "flux" else (1, 16, 2, 4, 4), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.6])
    kwargs = {"y": torch.from_numpy(pooled)[None], "guidance": torch.tensor([3.5])} if family == "flux" else {}
    with torch.no_grad():
        denoised = patcher.model.apply_model(x, sigma, c_crossattn=context, **kwargs)
        with networks.fp8_weights(model):
            v = networks.predict_v(model, family, x, sigma, context, kwargs.get("y"), kwargs.get("guidance"))
    assert torch.allclose(denoised, x - sigma * v, atol=2e-3, rtol=2e-3)


@pytest.mark.comfyui
@pytest.mark.comfyui_versions(since=(0, 19))
def test_real_flux_loads_in_fp8_through_the_stock_loader(comfyui_v19, tmp_path):
    from chipmunk_pack.lab import networks

    path = tmp_path / networks.REAL_CHECKPOINT_NAMES["flux"]
    model = _save_random("flux", path)
    assert path.stat().st_size < 5_500_000
    _check_loaded("flux", model, path, tmp_path)


@pytest.mark.comfyui
def test_real_wan_loads_in_fp8_through_the_stock_loader(comfy_inprocess, tmp_path):
    """Also on v0.3.64 (whose FLUX detection fixes FLUX's width at 3072: no small FLUX loads there)."""
    from chipmunk_pack.lab import networks

    path = tmp_path / networks.REAL_CHECKPOINT_NAMES["wan"]
    model = _save_random("wan", path)
    assert path.stat().st_size < 4_000_000
    _check_loaded("wan", model, path, tmp_path)


def _sprites_file(tmp_path):
    out = tmp_path / "sprites.npz"
    rng = np.random.default_rng(0)
    arrays = {"sprites": rng.integers(0, 255, (len(vocab.CLASSES), 64, 64, 4), dtype=np.uint8),
              "meta": np.frombuffer(json.dumps({"classes": [{"word": w} for w in vocab.CLASS_WORDS]}).encode(), np.uint8)}
    arrays.update(data.render_text_lines(None, count=4))
    data.save(arrays, out)
    return out


@pytest.mark.comfyui
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_real_training_tiny_resumes_and_installs(comfyui_v19, comfyui_dir, toy_models, tmp_path, family):
    from safetensors.torch import load_file

    from chipmunk_pack.lab import install, networks, real

    sprites = _sprites_file(tmp_path)
    common = ["--family", family, "--preset", "tiny", "--device", "cpu", "--comfyui", str(comfyui_dir),
              "--data", str(sprites), "--models", str(toy_models)]
    first = tmp_path / "first"
    extra = ["--tae-seconds", "1"] if family == "wan" else []
    assert real.main(common + extra + ["--out", str(first), "--work", str(tmp_path / "w1")]) == 0
    log = json.loads((first / "train_log.json").read_text())
    assert log["phases"]["low"]["steps"] == 2 and log["phases"]["high"]["steps"] == 2
    assert "psnr_fewer_vs_full_db" in log["check"]["by_steps"]
    assert (first / f"preview_{family}.png").is_file()
    assert all(p.stat().st_size <= real.PART_BYTES for p in first.iterdir())
    if family == "wan":
        assert "held_out_psnr_after" in log["video_decoder"]

    second = tmp_path / "second"
    assert real.main(common + ["--resume", str(first), "--no-check", "--out", str(second),
                               "--work", str(tmp_path / "w2")]) == 0
    members = real._resume_members(second)
    before = load_file(str(tmp_path / "w1" / "resume" / f"{family}.safetensors"))
    after = real._load_bytes(members[f"resume/{family}.safetensors"])
    assert before.keys() == after.keys()
    key = next(k for k in before if before[k].dim() == 2)
    # resumed: close to the first run's weights (two small steps), not a fresh initialisation
    assert (after[key].float() - before[key].float()).abs().max() < 0.02

    models = tmp_path / "models"
    sizes = install.install(second, models)
    name = f"diffusion_models/{networks.REAL_CHECKPOINT_NAMES[family]}"
    assert name in sizes and not any(k.startswith("resume/") for k in sizes)
    assert next(iter(load_file(str(models / name)).values())).dtype == torch.float8_e4m3fn
    assert (models / f"train_log_{family}.json").is_file()


@pytest.mark.comfyui
def test_classifier_finetune_tiny(comfyui_v19, comfyui_dir, toy_models, tmp_path):
    from chipmunk_pack.lab import install, real

    out = tmp_path / "out"
    assert real.main(["--family", "classifier", "--preset", "tiny", "--device", "cpu", "--comfyui", str(comfyui_dir),
                      "--data", str(_sprites_file(tmp_path)), "--models", str(toy_models), "--out", str(out),
                      "--work", str(tmp_path / "w")]) == 0
    log = json.loads((out / "train_log.json").read_text())
    entry = log["classifier"]
    assert entry["steps"] == 2 and set(entry["held_out_accuracy_after"]) == {"toy", "rich"}
    assert (tmp_path / "w" / "classifier" / "toy_classifier.safetensors").is_file() == entry["kept"]
    models = tmp_path / "models"
    install.install(out, models)
    assert (models / "train_log_classifier.json").is_file() and not (models / "train_log.json").exists()
