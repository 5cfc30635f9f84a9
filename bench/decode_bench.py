"""What one core decodes of full-resolution chest films: the ingest bound of the first cycle on
real data (the README's "What a cycle costs at scale").

    python bench/decode_bench.py [--height 2828] [--width 2320] [--size 224] [--repeats 9]

Writes one synthetic film of CheXpert's full size as a JPEG (smooth anatomy-like bands and noise,
so its file size is a real film's, a few MB), then times, on one thread, what a training worker
does with each original film: `decode_grayscale` and the resize to the pre-crop size. The peer is
PIL on its own (open, convert to gray, resize), so the library's checks and conversions are
priced. Prints the median ms a film and films/s a core for both.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from cycle.config import load_config  # noqa: E402
from cycle.data.transforms import decode_grayscale, preprocess_from_config  # noqa: E402


def synthetic_film(height: int, width: int) -> bytes:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    film = 128 + 60 * np.sin(x / 200.0) * np.cos(y / 300.0) + rng.normal(0, 12, (height, width))
    out = io.BytesIO()
    Image.fromarray(film.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=95)
    return out.getvalue()


def median_ms(fn, repeats: int) -> float:
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=2828)
    parser.add_argument("--width", type=int, default=2320)
    parser.add_argument("--size", type=int, default=224, help="the pre-crop size films resize to")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    data = synthetic_film(args.height, args.width)
    crop = round(args.size * 0.875)
    preprocess = preprocess_from_config(load_config(None, [f"data.image_size={crop}"]).data)
    size = preprocess.resize_to

    def ours():
        preprocess.resize(decode_grayscale(data))

    def peer():
        Image.open(io.BytesIO(data)).convert("L").resize((size, size), Image.BILINEAR)

    print(f"one {args.width} x {args.height} JPEG of {len(data) / 1e6:.1f} MB, to {size} px")
    for name, fn in (("decode_grayscale + resize", ours), ("PIL open, gray, resize", peer)):
        ms = median_ms(fn, args.repeats)
        print(f"  {name:<28} {ms:7.1f} ms a film   {1000 / ms:6.1f} films/s a core")


if __name__ == "__main__":
    main()
