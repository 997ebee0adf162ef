"""Build the lab's data file: the sprites of the toy classes, taken from the npm package
``emoji-datasource-google`` (Noto Color Emoji artwork, Apache-2.0; see lab/DATA.md).

The data file holds only the 64x64 RGBA sprite of each class in ``vocab.CLASSES`` (about 0.5 MB);
every training scene and clip is composed from them on the fly (lab/scenes.py), so the data set
itself is never stored. Deterministic: the same package version gives the same file.

    npm pack emoji-datasource-google@16.0.0          # -> emoji-datasource-google-16.0.0.tgz
    python -m lab.data emoji-datasource-google-16.0.0.tgz --out .device/toy_sprites.npz

The package may also be given as an unpacked folder (the one holding emoji.json).

``--fonts DIR`` (a folder of TrueType fonts, e.g. Debian's fonts-dejavu-core folder) adds rendered
lines of text to the file (``text``: [S, TEXT_HEIGHT, TEXT_WIDTH] uint8 coverage, ``text_widths``:
each line's inked width), which the real-scale scenes (lab/rich.py) place as signs and captions.
The strings are seeded random letters, digits and vocabulary words; the machine that trains needs
no fonts.
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
TEXT_LINES, TEXT_HEIGHT, TEXT_WIDTH = 384, 48, 384
TEXT_SEED = 515


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


def render_text_lines(fonts: Path | None, count: int = TEXT_LINES) -> dict:
    """``count`` lines of text, each in one of the fonts under ``fonts`` (sorted *.ttf; None: Pillow's
    built-in font), as coverage masks [count, TEXT_HEIGHT, TEXT_WIDTH] (left-aligned, vertically
    centred, clipped at the width)."""
    from PIL import Image, ImageDraw, ImageFont

    from .vocab import VOCABULARY

    files = sorted(p for p in Path(fonts).rglob("*.ttf")) if fonts is not None else [None]
    if not files:
        raise FileNotFoundError(f"no .ttf fonts under {fonts}")
    rng = np.random.default_rng(TEXT_SEED)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    words = [w for w in VOCABULARY if not w.startswith("<")]
    lines, widths, texts = [], [], []
    for i in range(count):
        parts = []
        for _ in range(int(rng.integers(1, 4))):
            if rng.random() < 0.5:
                parts.append(str(words[int(rng.integers(len(words)))]))
            else:
                parts.append("".join(alphabet[int(j)] for j in rng.integers(len(alphabet), size=int(rng.integers(2, 9)))))
        text = " ".join(parts)
        text = text.upper() if rng.random() < 0.3 else text
        file = files[int(rng.integers(len(files)))]
        size = int(TEXT_HEIGHT * 0.72)
        font = ImageFont.truetype(str(file), size=size) if file is not None else ImageFont.load_default(size=size)
        image = Image.new("L", (TEXT_WIDTH, TEXT_HEIGHT), 0)
        draw = ImageDraw.Draw(image)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        draw.text((2 - left, (TEXT_HEIGHT - (bottom - top)) // 2 - top), text, fill=255, font=font)
        lines.append(np.asarray(image, dtype=np.uint8))
        widths.append(min(TEXT_WIDTH, right - left + 4))
        texts.append(text)
    return {"text": np.stack(lines), "text_widths": np.array(widths, dtype=np.int32),
            "text_meta": np.frombuffer(json.dumps({"fonts": [p.name if p else "pillow-default" for p in files], "lines": texts}).encode(),
                                       dtype=np.uint8)}


def load_text(path: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(uint8 text lines [S, H, W], inked widths [S]) of a data file, or None if it has none."""
    with np.load(path) as data:
        if "text" not in data.files:
            return None
        return data["text"], data["text_widths"]


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
    parser.add_argument("--fonts", type=Path, help="a folder of .ttf fonts: adds rendered text lines (lab/rich.py)")
    args = parser.parse_args(argv)
    arrays = build(args.package)
    if args.fonts:
        arrays.update(render_text_lines(args.fonts))
    save(arrays, args.out)
    print(f"{args.out}: {len(arrays['sprites'])} sprites, {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
