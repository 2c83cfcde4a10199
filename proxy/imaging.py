"""The image pipeline: source bytes in, variant bytes out, with libvips.

The steps run in a worker thread, because libvips releases the GIL while it works:
detect the source format, thumbnail with shrink-on-load to the width, convert the
colour to 8-bit sRGB, flatten alpha for JPEG, and encode without metadata.
"""

import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyvips

from .errors import ProcessingTimedOut, SourceTooLarge, UndecodableSource, UnsupportedFormat
from .settings import Settings

# libvips keeps recent operations and their pixels in a cache that a server
# decoding different images on every request never reuses.
pyvips.cache_set_max(0)

# libvips keeps its default of one worker thread per core for each image
# (VIPS_CONCURRENCY changes it). The AVIF encoder splits its work over these
# threads: a 2200 px AVIF took 1.8 s with one thread and 1.0 s with two.

# glibc's M_ARENA_MAX parameter of mallopt(3).
M_ARENA_MAX = -8


def limit_malloc_arenas(count: int = 2) -> bool:
    """Cap glibc's malloc arenas at `count`, unless MALLOC_ARENA_MAX is set.

    glibc gives each new thread an arena of its own, up to 8 per core, and memory
    freed in one arena is not reused by the others. With several threads decoding
    large images this multiplies the peak resident memory. Returns whether the
    cap was set, which it is not with a C library other than glibc.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        # glibc read the variable when the process started.
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, count))
    except (OSError, AttributeError):
        return False


# Before any resize thread allocates, so that every thread shares the arenas.
limit_malloc_arenas()

# Source formats by libvips loader, as detected from the bytes.
LOADER_FORMATS = {
    "jpegload_buffer": "jpeg",
    "pngload_buffer": "png",
    "webpload_buffer": "webp",
    "gifload_buffer": "gif",
    "tiffload_buffer": "tiff",
    "heifload_buffer": "heif",
    "svgload_buffer": "svg",
}

CONTENT_TYPES = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "avif": "image/avif",
}

# File signatures of the source formats, to tell a damaged image (422) from a file
# that is not an image at all (415) when libvips cannot read the header.
SIGNATURES = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)
HEIF_BRANDS = (b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")

# Largest side, in pixels, that each encoder writes with the libvips 8.18.7 of
# pyvips-binary: WebP and AVIF past these failed with "image too large" when
# tried, libjpeg reports 65500 as its maximum, and 10,000,000 is libvips' own cap.
MAX_OUTPUT_SIDE = {"jpg": 65500, "webp": 16383, "avif": 16384, "png": 10_000_000}

# `thumbnail` fits a box, so an unreachable height makes the width the only limit.
# libvips caps coordinates at 10,000,000.
UNBOUNDED_HEIGHT = 10_000_000


class _Deadline:
    """Stop the libvips work on watched images once `seconds` have passed.

    libvips reports progress while it computes pixels, and the handler marks the
    image as killed when time is up, which ends the computation with an error.
    Work that reports no progress, such as an AVIF encode after its pixels are
    computed, runs to its end, and the deadline is checked after it.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False

    def watch(self, image: pyvips.Image) -> pyvips.Image:
        image.set_progress(True)
        image.signal_connect("eval", self._on_eval)
        return image

    def _on_eval(self, image: pyvips.Image, progress: object) -> None:
        if time.monotonic() > self.end:
            self.expired = True
            image.set_kill(True)

    def check(self) -> None:
        if self.expired or time.monotonic() > self.end:
            raise self.error()

    def error(self) -> ProcessingTimedOut:
        return ProcessingTimedOut(
            f"making the variant timed out after {self.seconds:g} s (PROXY_PROCESSING_TIMEOUT) "
            "and was stopped; raise PROXY_PROCESSING_TIMEOUT or upload a smaller source"
        )


@dataclass(frozen=True)
class EncodedImage:
    body: bytes
    content_type: str
    width: int
    height: int


def detect_format(data: bytes) -> str:
    """Name the format of `data` from its bytes, for example `jpeg`.

    Raises UnsupportedFormat when no enabled loader recognises the bytes.
    """
    return _open_header(data)[0]


def _open_header(data: bytes) -> tuple[str, pyvips.Image]:
    """Read the format and the header of `data`; pixels are decoded later, if at all."""
    try:
        header = pyvips.Image.new_from_buffer(data, "")
        loader = header.get("vips-loader")
    except pyvips.Error as error:
        # A known signature whose header cannot be read is a damaged or cut
        # file; anything else is not an image this service reads.
        signature = _signature_format(data)
        if signature is not None:
            raise UndecodableSource(
                f"{signature} source could not be decoded ({_first_line(error)}); "
                "check that the file is complete and upload it again"
            ) from None
        raise UnsupportedFormat(
            "source is not an image in a supported format (JPEG, PNG, WebP, GIF, TIFF, "
            "AVIF or SVG); upload it in one of them"
        ) from None
    source_format = LOADER_FORMATS.get(loader)
    if source_format is None:
        raise UnsupportedFormat(f"source format {loader.removesuffix('load_buffer')!r} is not supported")
    if source_format == "heif" and header.get("heif-compression") == "hevc":
        # libheif in pyvips-binary 8.18.7 reads HEIC headers but has no HEVC
        # decoder, so the pixels would fail later with a misleading 422.
        raise UnsupportedFormat(
            "source format HEIC (HEVC-compressed HEIF) is not supported; "
            "convert it to JPEG, PNG, WebP or AVIF and upload it again"
        )
    return source_format, header


def _signature_format(data: bytes) -> str | None:
    """Name the format that the first bytes of `data` announce, if any."""
    for signature, name in SIGNATURES:
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[4:8] == b"ftyp" and data[8:12] in HEIF_BRANDS:
        return "heif"
    # SVG is text: an XML declaration or comment, or the root element, after any
    # byte order mark and white space.
    text = data[:1024].removeprefix(b"\xef\xbb\xbf").lstrip()
    if text.startswith((b"<?xml", b"<!--", b"<!DOCTYPE svg", b"<svg")) and b"<svg" in data[:4096]:
        return "svg"
    return None


def _check_output_size(header: pyvips.Image, width: int, output_format: str) -> None:
    """Reject a variant whose sides would exceed what its encoder can write."""
    source_width, source_height = header.width, header.height
    if _oriented_width(header) != header.width:
        source_width, source_height = source_height, source_width
    output_width = min(width, source_width)
    output_height = max(1, round(source_height * output_width / source_width))
    limit = MAX_OUTPUT_SIDE[output_format]
    if max(output_width, output_height) > limit:
        raise UndecodableSource(
            f"the {output_width}×{output_height} variant is over the {limit}-pixel side "
            f"limit of {output_format}; request jpg or png for this source"
        )


def make_variant(data: bytes, width: int, output_format: str, settings: Settings) -> EncodedImage:
    """Resize `data` to `width` pixels wide and encode it as `output_format`.

    A 5640×3172 JPEG at width 720 gives 720×405. A source narrower than `width`
    keeps its own size, because a variant is never enlarged.
    """
    variant = make_variants(data, [(width, output_format)], settings)[0]
    assert variant is not None, "make_variants returns None only with skip_oversized"
    return variant


def make_variants(
    data: bytes, sizes: list[tuple[int, str]], settings: Settings, *, skip_oversized: bool = False
) -> list[EncodedImage | None]:
    """Make one variant per (width, output format) pair, decoding the source once.

    The source is decoded with shrink-on-load at the largest width asked for, and
    the smaller widths are resized from that decode. The results follow the order
    of `sizes`. A variant over its format's side limit raises UndecodableSource,
    or with `skip_oversized` is None in the results while the others are made.

    Every variant is a still image. An animated GIF or WebP gives its first frame
    in every output format, because libvips loads one page when no page count (`n`)
    is passed. An SVG source is rasterised by librsvg, which runs no
    `<script>` and draws no `<foreignObject>` content, and is never served as SVG.

    The work stops with ProcessingTimedOut after `settings.processing_timeout`
    seconds, counted from the call.
    """
    decoded = decode_source(data, sizes, settings, skip_oversized=skip_oversized)
    return [
        encode_variant(decoded, width, output_format, settings) if (width, output_format) in decoded.sizes else None
        for width, output_format in sizes
    ]


@dataclass(frozen=True)
class DecodedSource:
    """A source decoded once, at the largest width of `sizes`, for `encode_variant`."""

    image: pyvips.Image | None
    source_format: str
    # The requested sizes that can be made; oversized ones are left out.
    sizes: tuple[tuple[int, str], ...]
    deadline: _Deadline
    # Smaller widths made by `resized`, kept for the other formats of that width.
    _resized: dict[int, pyvips.Image] = field(default_factory=dict, repr=False, compare=False)
    _resize_lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    def resized(self, width: int) -> pyvips.Image:
        """Return the image at `width` (not wider than the decoded image), kept in memory.

        Each width is resized once, from the next larger width in `sizes`, and
        shared by every format of that width. For 2200, 1200, 720 and 360 px
        this took 37 ms against 108 ms for resizing each variant from the
        largest, and on five photographs the results were within 47 dB PSNR of
        direct resizes. The result has the size that resizing the decoded image gives.
        """
        assert self.image is not None
        if width >= self.image.width:
            return self.image
        with self._resize_lock:
            image = self._resized.get(width)
            if image is None:
                larger = [size for size, _ in self.sizes if width < size < self.image.width]
                start = self.resized(min(larger)) if larger else self.image
                height = self.image.thumbnail_image(width, height=UNBOUNDED_HEIGHT, size="down").height
                image = start.thumbnail_image(width, height=UNBOUNDED_HEIGHT, size="down")
                if image.height != height:
                    # Rounding along the chain can make the height differ by a pixel.
                    image = start.thumbnail_image(width, height=height, size="force")
                image = self.deadline.watch(image).copy_memory()
                self._resized[width] = image
            return image


def decode_source(
    data: bytes, sizes: list[tuple[int, str]], settings: Settings, *, skip_oversized: bool = False
) -> DecodedSource:
    """Decode `data` for the variants in `sizes`, with the checks of `make_variants`.

    With more than one size the pixels are kept in memory, and `encode_variant`
    may then run for several sizes at once in different threads.
    """
    deadline = _Deadline(settings.processing_timeout)
    source_format, header = _open_header(data)
    # The header alone gives the size and the frame count, so an oversized image
    # is rejected before any pixel is decoded.
    pixels = header.width * header.height
    if pixels > settings.max_pixels:
        raise SourceTooLarge(
            f"source is {header.width}×{header.height} pixels, over the limit of "
            f"{settings.max_pixels} (PROXY_MAX_PIXELS)"
        )
    frames = header.get("n-pages") if header.get_typeof("n-pages") != 0 else 1
    if frames > settings.max_frames:
        raise SourceTooLarge(
            f"source has {frames} frames, over the limit of {settings.max_frames} "
            "(PROXY_MAX_FRAMES); upload a still image or fewer frames"
        )
    possible = []
    for width, output_format in sizes:
        try:
            _check_output_size(header, width, output_format)
            possible.append((width, output_format))
        except UndecodableSource:
            if not skip_oversized:
                raise
    if not possible:
        return DecodedSource(None, source_format, (), deadline)
    largest_width = max(width for width, _ in possible)
    with _pipeline_errors(source_format, deadline):
        if len(possible) > 1 and source_format == "jpeg":
            largest = _thumbnail_jpeg(data, largest_width, _oriented_width(header))
        else:
            largest = _thumbnail(data, largest_width, source_format)
        largest = _to_srgb(largest)
        if len(possible) > 1:
            # A libvips pipeline can be read once; keeping the decoded pixels in
            # memory lets every variant read them.
            largest = deadline.watch(largest).copy_memory()
    return DecodedSource(largest, source_format, tuple(possible), deadline)


def encode_variant(decoded: DecodedSource, width: int, output_format: str, settings: Settings) -> EncodedImage:
    """Resize a decoded source to `width` and encode it; the size must be in `decoded.sizes`."""
    assert decoded.image is not None and (width, output_format) in decoded.sizes
    decoded.deadline.check()
    with _pipeline_errors(decoded.source_format, decoded.deadline):
        encoded = _make_one(decoded.resized(width), width, output_format, settings, decoded.deadline)
    decoded.deadline.check()
    return encoded


@contextlib.contextmanager
def _pipeline_errors(source_format: str, deadline: _Deadline) -> Iterator[None]:
    """Turn a libvips failure into ProcessingTimedOut or UndecodableSource."""
    try:
        yield
    except pyvips.Error as error:
        if deadline.expired:
            raise deadline.error() from None
        raise UndecodableSource(
            f"{source_format} source could not be decoded ({_first_line(error)}); "
            "check that the file is complete and upload it again"
        ) from None


def _make_one(
    largest: pyvips.Image, width: int, output_format: str, settings: Settings, deadline: _Deadline
) -> EncodedImage:
    image = largest
    if width < largest.width:
        image = largest.thumbnail_image(width, height=UNBOUNDED_HEIGHT, size="down")
    if output_format == "jpg":
        image = _flatten(image, settings.background_rgb)
    body = _encode(deadline.watch(image), output_format, settings)
    return EncodedImage(body, CONTENT_TYPES[output_format], image.width, image.height)


def _thumbnail(data: bytes, width: int, source_format: str) -> pyvips.Image:
    # Shrink-on-load decodes a JPEG at 1/2, 1/4 or 1/8 scale when that is enough.
    # `fail_on` goes in the option string: as a keyword argument it did not reject
    # a truncated JPEG with libvips 8.18.7. "error" also rejects a TIFF whose strips
    # are cut off, which "truncated" let through as black rows. "warning" is not
    # used, because it would also reject JPEGs with harmless warnings.
    options = "fail_on=error" if source_format != "svg" else ""
    return pyvips.Image.thumbnail_buffer(
        data,
        width,
        height=UNBOUNDED_HEIGHT,
        size="down",
        option_string=options,
    )


def _jpeg_shrink(source_width: int, width: int) -> int:
    """Return the coarsest scaled-decode factor (1, 2, 4 or 8) that keeps `width` pixels."""
    shrink = 1
    while shrink < 8 and source_width >= width * shrink * 2:
        shrink *= 2
    return shrink


def _thumbnail_jpeg(data: bytes, width: int, source_width: int) -> pyvips.Image:
    """Resize a JPEG to `width`, decoding it at the coarsest libjpeg scale that is still as wide.

    `thumbnail` leaves at least a factor of two for its Lanczos3 step, so for a
    6000 px source and 2200 px it decodes every pixel. The scaled decode of
    libjpeg, at 1/2 here, made the decode and resize 1.5 times faster. On three
    photographs the results were within 42 to 48 dB PSNR of thumbnail's.
    """
    shrink = _jpeg_shrink(source_width, width)
    image = pyvips.Image.new_from_buffer(data, "", shrink=shrink, access="sequential", fail_on="error")
    return image.thumbnail_image(width, height=UNBOUNDED_HEIGHT, size="down")


def _oriented_width(header: pyvips.Image) -> int:
    """Return the width of the image once its EXIF orientation is applied.

    Orientations 5 to 8 turn the image by 90 degrees.
    """
    if header.get_typeof("orientation") != 0 and header.get("orientation") in (5, 6, 7, 8):
        return header.height
    return header.width


def _to_srgb(image: pyvips.Image) -> pyvips.Image:
    """Convert to 8-bit sRGB, or 8-bit grey for a grey source, using any ICC profile."""
    if _has_foreign_profile(image):
        image = image.icc_transform("srgb", embedded=True, intent="perceptual")
    if image.interpretation in ("b-w", "grey16"):
        if image.interpretation == "grey16" or image.format != "uchar":
            image = image.colourspace("b-w")
        return image
    if image.interpretation != "srgb" or image.format != "uchar":
        image = image.colourspace("srgb")
    return image


def _has_foreign_profile(image: pyvips.Image) -> bool:
    """Return whether the image carries an ICC profile other than sRGB.

    Most camera JPEGs embed an sRGB profile, and transforming those costs time for
    no change. Profiles are recognised by the name in their description tag.
    """
    if image.get_typeof("icc-profile-data") == 0:
        return False
    if image.interpretation not in ("srgb", "rgb16"):
        return True
    return b"sRGB" not in image.get("icc-profile-data")


def _flatten(image: pyvips.Image, background: list[int]) -> pyvips.Image:
    if not image.hasalpha():
        return image
    if image.bands <= 2:
        return image.flatten(background=[sum(background) / 3])
    return image.flatten(background=background)


def _encode(image: pyvips.Image, output_format: str, settings: Settings) -> bytes:
    # keep="none" drops EXIF (GPS included), XMP, IPTC and the ICC profile; the
    # pixels are sRGB by now, which is what browsers assume without a profile.
    if output_format == "jpg":
        return image.jpegsave_buffer(Q=settings.jpeg_quality, keep="none", optimize_coding=True)
    if output_format == "webp":
        return image.webpsave_buffer(Q=settings.webp_quality, effort=settings.webp_effort, keep="none")
    if output_format == "avif":
        return image.heifsave_buffer(
            Q=settings.avif_quality,
            effort=settings.avif_effort,
            compression="av1",
            keep="none",
        )
    if output_format == "png":
        return image.pngsave_buffer(compression=settings.png_compression, keep="none")
    raise ValueError(f"unknown output format {output_format!r}")


def _first_line(error: pyvips.Error) -> str:
    text = (error.detail or error.message or "").strip()
    return text.splitlines()[0] if text else "unknown libvips error"
