"""Build the lab's data file: the sprites of the toy classes, taken from the npm package
``emoji-datasource-google`` (Noto Color Emoji artwork, Apache-2.0; see lab/DATA.md).

The data file holds only the 64x64 RGBA sprite of each class in ``vocab.CLASSES`` (about 0.5 MB);
every training scene and clip is composed from them on the fly (lab/scenes.py), so the data set
itself is never stored. Deterministic: the same package version gives the same file.

    npm pack emoji-datasource-google@16.0.0          # -> emoji-datasource-google-16.0.0.tgz
    python -m lab.data emoji-datasource-google-16.0.0.tgz --out .device/toy_sprites.npz

The package may also be given as an unpacked folder (the one holding emoji.json).
"""
from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import numpy as np

from .vocab import CLASSES

PACKAGE = "emoji-datasource-google"
SPRITE_SIZE = 64


class _PackageReader:
    """Files of the npm package, from its .tgz (entries under package/) or an unpacked folder."""

    def __init__(self, source: Path):
        self.source = source
        self.tar = tarfile.open(source, "r:gz") if source.is_file() else None

    def read(self, relative: str) -> bytes:
        if self.tar is not None:
            return self.tar.extractfile(f"package/{relative}").read()
        return (self.source / relative).read_bytes()


def build(source: Path) -> dict:
    """The arrays and metadata of the data file."""
    from PIL import Image

    package = _PackageReader(source)
    manifest = json.loads(package.read("package.json"))
    if manifest.get("name") != PACKAGE:
        raise ValueError(f"{source} is {manifest.get('name')!r}, not {PACKAGE}")
    by_name = {e["short_name"]: e for e in json.loads(package.read("emoji.json"))}
    sprites = []
    for cls in CLASSES:
        entry = by_name[cls.short_name]
        image = Image.open(io.BytesIO(package.read(f"img/google/64/{entry['image']}"))).convert("RGBA")
        if image.size != (SPRITE_SIZE, SPRITE_SIZE):
            image = image.resize((SPRITE_SIZE, SPRITE_SIZE), Image.LANCZOS)
        sprites.append(np.asarray(image, dtype=np.uint8))
    meta = {"package": PACKAGE, "version": manifest["version"], "licence": "Apache-2.0 (Noto Emoji images)",
            "classes": [{"word": c.word, "short_name": c.short_name, "category": c.category,
                         "unified": by_name[c.short_name]["unified"]} for c in CLASSES]}
    return {"sprites": np.stack(sprites), "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}


def save(arrays: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)


def load_sprites(path: str | Path) -> tuple[np.ndarray, dict]:
    """(uint8 sprites [K, 64, 64, 4], metadata) from a data file."""
    with np.load(path) as data:
        meta = json.loads(data["meta"].tobytes().decode())
        sprites = data["sprites"]
    if [c["word"] for c in meta["classes"]] != [c.word for c in CLASSES]:
        raise ValueError(f"{path} was built for another class list; rebuild it with python -m lab.data")
    return sprites, meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path, help=f"{PACKAGE} .tgz (from npm pack) or its unpacked folder")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    arrays = build(args.package)
    save(arrays, args.out)
    print(f"{args.out}: {len(arrays['sprites'])} sprites, {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
