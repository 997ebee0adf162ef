"""Put the results of a training run (``python -m lab.train ... --out DIR``) into lab/models.

    python -m lab.install DIR [--models lab/models]

Joins ``DIR/models.tar.NN``, extracts the model files (and nothing else) into the models folder,
copies ``train_log.json`` next to them, and refuses a set larger than ``LIMIT_BYTES``.

Results of ``python -m lab.real`` (the real-scale models) install the same way: their fp8
``diffusion_models/chipmunk-lab-*.safetensors`` (and a fine-tuned ``vae_approx/lighttaew2_1``, when the
run kept one) go into the models folder, their ``resume/`` training weights stay out of it, and their
log lands as ``train_log_<family>.json``. After installing, the models folder must stay within
``MODELS_LIMIT_BYTES`` (the repository's size budget).
"""
from __future__ import annotations

import argparse
import io
import shutil
import tarfile
from pathlib import Path

LIMIT_BYTES = 40_000_000
MODELS_LIMIT_BYTES = 47_700_000  # lab/models in all after installing: the tracked tree must stay under 52 MB
FOLDERS = ("diffusion_models", "vae_approx", "classifier")
NOT_INSTALLED = ("resume",)
MODELS_DIR = Path(__file__).resolve().parent / "models"


def install(results: Path, models: Path = MODELS_DIR) -> dict[str, int]:
    parts = sorted(results.glob("models.tar.[0-9][0-9]"))
    if not parts:
        raise FileNotFoundError(f"no models.tar.NN parts in {results}")
    archive = tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts)))
    members = [m for m in archive.getmembers() if m.isfile() and m.name.partition("/")[0] not in NOT_INSTALLED]
    for m in members:
        folder, _, name = m.name.partition("/")
        if folder not in FOLDERS or "/" in name or not name.endswith(".safetensors"):
            raise ValueError(f"unexpected file in the results: {m.name}")
    total = sum(m.size for m in members)
    if total > LIMIT_BYTES:
        raise ValueError(f"the toy models take {total} bytes, more than the {LIMIT_BYTES} allowed")
    replaced = sum((models / m.name).stat().st_size for m in members if (models / m.name).is_file())
    existing = sum(p.stat().st_size for p in models.rglob("*") if p.is_file()) if models.is_dir() else 0
    if existing - replaced + total > MODELS_LIMIT_BYTES:
        raise ValueError(f"installing would make {models} {existing - replaced + total} bytes, more than the "
                         f"{MODELS_LIMIT_BYTES} allowed")
    sizes = {}
    for m in members:
        target = models / m.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(archive.extractfile(m).read())
        sizes[m.name] = m.size
    log = results / "train_log.json"
    if log.is_file():
        models.mkdir(parents=True, exist_ok=True)
        family = _real_family(log)
        shutil.copyfile(log, models / (f"train_log_{family}.json" if family else "train_log.json"))
    return sizes


def _real_family(log: Path) -> str | None:
    """The family of a ``lab.real`` run's log (None for lab.train's logs)."""
    import json

    try:
        data = json.loads(log.read_text())
    except ValueError:
        return None
    family = data.get("family") if isinstance(data, dict) else None
    return family if family in ("flux", "wan", "classifier") and "plan" in data else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--models", type=Path, default=MODELS_DIR)
    args = parser.parse_args(argv)
    sizes = install(args.results, args.models)
    for name, size in sorted(sizes.items()):
        print(f"{size:>12,d}  {name}")
    print(f"{sum(sizes.values()):>12,d}  total in {args.models}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
