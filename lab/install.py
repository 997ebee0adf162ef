"""Put the results of a training run (``python -m lab.train ... --out DIR``) into lab/models.

    python -m lab.install DIR [--models lab/models]

Joins ``DIR/models.tar.NN``, extracts the model files (and nothing else) into the models folder,
copies ``train_log.json`` next to them, and refuses a set larger than ``LIMIT_BYTES``.
"""
from __future__ import annotations

import argparse
import io
import shutil
import tarfile
from pathlib import Path

LIMIT_BYTES = 40_000_000
FOLDERS = ("diffusion_models", "vae_approx", "classifier")
MODELS_DIR = Path(__file__).resolve().parent / "models"


def install(results: Path, models: Path = MODELS_DIR) -> dict[str, int]:
    parts = sorted(results.glob("models.tar.[0-9][0-9]"))
    if not parts:
        raise FileNotFoundError(f"no models.tar.NN parts in {results}")
    archive = tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts)))
    members = [m for m in archive.getmembers() if m.isfile()]
    for m in members:
        folder, _, name = m.name.partition("/")
        if folder not in FOLDERS or "/" in name or not name.endswith(".safetensors"):
            raise ValueError(f"unexpected file in the results: {m.name}")
    total = sum(m.size for m in members)
    if total > LIMIT_BYTES:
        raise ValueError(f"the toy models take {total} bytes, more than the {LIMIT_BYTES} allowed")
    sizes = {}
    for m in members:
        target = models / m.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(archive.extractfile(m).read())
        sizes[m.name] = m.size
    if (results / "train_log.json").is_file():
        shutil.copyfile(results / "train_log.json", models / "train_log.json")
    return sizes


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
