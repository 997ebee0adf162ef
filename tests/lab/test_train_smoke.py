"""The training command at toy sizes on the CPU: every job runs, saves files the stock loaders
take, the packed results install into a models folder, and a resumed run continues from them."""
from __future__ import annotations

import json
import time

import pytest

from chipmunk_pack.lab import install, train

pytestmark = pytest.mark.comfyui


def test_training_jobs_pack_and_install(comfyui_v19, comfyui_dir, tmp_path):
    import numpy as np

    from chipmunk_pack.lab import data, vocab

    sprites = tmp_path / "sprites.npz"
    data.save({"sprites": np.random.default_rng(0).integers(0, 255, (len(vocab.CLASSES), 64, 64, 4), dtype=np.uint8),
               "meta": np.frombuffer(b'{"classes": [' + b",".join(
                   b'{"word": "%s"}' % c.word.encode() for c in vocab.CLASSES) + b"]}", dtype=np.uint8)}, sprites)
    work = tmp_path / "work"
    for job in ("classifier", "image", "video"):
        code = train.main(["--job", job, "--preset", "tiny", "--device", "cpu", "--comfyui", str(comfyui_dir),
                           "--data", str(sprites), "--work", str(work), "--deadline", str(time.time() + 600)])
        assert code == 0
    written = train.pack_results(work, tmp_path / "out")
    assert {p.name for p in written} >= {"models.tar.00", "models.tar.01", "train_log.json", "preview_flux.png",
                                         "preview_wan.png"}
    assert all(p.stat().st_size <= train.PART_BYTES for p in written)
    sizes = install.install(tmp_path / "out", tmp_path / "models")
    assert len(sizes) == 6 and sum(sizes.values()) <= install.LIMIT_BYTES
    assert (tmp_path / "models" / "train_log.json").is_file()

    # --resume: the autoencoders and the classifier are kept byte for byte, the DiTs train on.
    resumed = tmp_path / "resumed"
    for job in ("classifier", "image", "video"):
        code = train.main(["--job", job, "--preset", "tiny", "--device", "cpu", "--comfyui", str(comfyui_dir),
                           "--data", str(sprites), "--work", str(resumed), "--deadline", str(time.time() + 600),
                           "--resume", str(tmp_path / "models")])
        assert code == 0
    image_log = json.loads((resumed / "logs" / "image.json").read_text())
    assert "taef1" not in image_log["phases"] and image_log["phases"]["flux_dit"]["resumed"]
    assert json.loads((resumed / "logs" / "video.json").read_text())["phases"]["wan_dit"]["resumed"]
    for kept in ("classifier/toy_classifier.safetensors", "vae_approx/taef1_decoder.safetensors",
                 "vae_approx/lighttaew2_1.safetensors"):
        assert (resumed / kept).read_bytes() == (tmp_path / "models" / kept).read_bytes(), kept
