"""Fixtures for the quality lab's tests.

``toy_models``: a folder laid out like lab/models (diffusion_models/, vae_approx/, classifier/).
It is lab/models itself when the trained files are there; a checkout without them (before a
retrain is installed) gets files of the same architectures with seeded random weights, so that
loading, sampling and the harness are still tested.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.paths import REPO_ROOT

COMMITTED = REPO_ROOT / "lab" / "models"


def toy_files() -> list[str]:
    from chipmunk_pack.lab import classifier, networks, tae

    return ([f"diffusion_models/{name}" for name in networks.CHECKPOINT_NAMES.values()]
            + [f"vae_approx/{name}" for name in (*tae.IMAGE_TAE_FILES, tae.VIDEO_TAE_FILE)]
            + [f"classifier/{classifier.FILE}"])


def write_random_models(folder: Path) -> None:
    import torch

    from chipmunk_pack.lab import classifier, networks, tae

    torch.manual_seed(0)
    for kind in ("diffusion_models", "vae_approx", "classifier"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for family in networks.CHECKPOINT_NAMES:
        model = networks.build(family)
        with torch.no_grad():
            for p in model.parameters():  # leave the adaLN-zero start: outputs must depend on the input
                p.add_(torch.randn_like(p) * 0.05)
        networks.save_checkpoint(model, folder / "diffusion_models" / networks.CHECKPOINT_NAMES[family])
    for autoencoder in (tae.ImageTAE(), tae.VideoTAE()):
        tae.init_weights_(autoencoder)
        autoencoder.save(folder / "vae_approx")
    classifier.save(classifier.Classifier(), folder / "classifier")


@pytest.fixture(scope="session")
def toy_models(comfyui_v19, tmp_path_factory) -> Path:
    if all((COMMITTED / name).is_file() for name in toy_files()):
        return COMMITTED
    folder = tmp_path_factory.mktemp("toy-models")
    write_random_models(folder)
    return folder
