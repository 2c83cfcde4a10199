"""Baseline: the Pillow resize of a typical hand-written image Lambda, on one thread.

Each run reads the source file and decodes it in full with Pillow. It calls no
`draft()`, so a JPEG is never decoded at reduced scale. Every width is then made
from the full-size image with a Lanczos resize, the height following the aspect
ratio, and saved as a JPEG at quality 90 into memory. One run is what one Lambda
invocation would do for a new upload. The proxy's pyvips pipeline and
`bench/floor.py` are compared against these times.

    .venv/bin/python bench/pillow_lambda.py --source photo.jpg --widths 360,720,1200,2200 --repeat 5

It prints one JSON object on stdout. A width larger than the source still
enlarges it here, unlike the proxy. Pillow's decompression-bomb limit is left at
its default (an error above about 179 million pixels with Pillow 13), which a
24-megapixel photo is far below.
"""

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

from PIL import Image, UnidentifiedImageError

JPEG_QUALITY = 90


def parse_widths(text: str) -> list[int]:
    """Parse a comma-separated list of positive widths, such as "360,720"."""
    try:
        widths = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths must be integers separated by commas, not {text!r}") from None
    if any(width < 1 for width in widths):
        raise argparse.ArgumentTypeError(f"widths must be positive, not {text!r}")
    return widths


def resize_all(path: Path, widths: list[int]) -> list[tuple[int, int, int]]:
    """Decode `path` once and encode one JPEG per width, returning (width, height, bytes) of each."""
    image = Image.open(io.BytesIO(path.read_bytes()))
    image.load()
    if image.mode != "RGB":
        # JPEG has no alpha, so an alpha channel is dropped rather than flattened.
        image = image.convert("RGB")

    outputs = []
    for width in widths:
        height = max(1, round(image.height * width / image.width))
        resized = image.resize((width, height), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        resized.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        outputs.append((width, height, buffer.tell()))
    return outputs


def main() -> int:
    """Parse the arguments, time `repeat` runs and print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="source image file")
    parser.add_argument(
        "--widths", type=parse_widths, default="360,720,1200,2200", help="comma-separated widths (default: %(default)s)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed runs (default: %(default)s)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not args.source.is_file():
        print(f"pillow_lambda: source not found: {args.source}", file=sys.stderr)
        return 2

    runs = []
    # One untimed run first, as the proxy is warmed up before it is timed, so
    # that imports and first-use costs are not counted.
    for run in range(args.repeat + 1):
        started = time.perf_counter()
        try:
            outputs = resize_all(args.source, args.widths)
        except UnidentifiedImageError:
            print(f"pillow_lambda: {args.source} is not an image that Pillow can read", file=sys.stderr)
            return 1
        except (OSError, Image.DecompressionBombError) as error:
            print(f"pillow_lambda: {args.source}: {error}", file=sys.stderr)
            return 1
        if run > 0:
            runs.append(time.perf_counter() - started)

    print(
        json.dumps(
            {
                "source": str(args.source),
                "widths": args.widths,
                "repeats": args.repeat,
                "median_s": round(statistics.median(runs), 4),
                "min_s": round(min(runs), 4),
                "runs_s": [round(seconds, 4) for seconds in runs],
                "outputs": [list(output) for output in outputs],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
