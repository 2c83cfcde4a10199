"""The preview page: every variant of one source, with its size and encode time.

`GET /preview/original/trips/p.jpg` encodes the source at each allowed width in
each of PROXY_FORMATS, shows the results side by side, and gives `<picture>`
markup to copy. The page only reads the store. Its `<img>` tags fetch the
variants through the variant route, which stores them as usual.
"""

import asyncio
import html
import time
from dataclasses import dataclass
from string import Template
from urllib.parse import quote

import pyvips
from fastapi import Request
from fastapi.responses import HTMLResponse

from . import imaging
from .errors import NotFound, Overloaded, SourceTooLarge, UnsupportedFormat
from .paths import SOURCE_EXTENSIONS, decode_key, parse_variant_path
from .settings import Settings
from .store.base import ObjectTooLarge, StoredObject
from .variants import VariantService, choose_source

ROUTE_PREFIX = b"/preview"

# Previews built at once per process. Each keeps a source of up to
# PROXY_MAX_SOURCE_MB in memory, and building one at a time keeps two pages
# from slowing down each other's encodes.
MAX_RUNNING_PREVIEWS = 1

# The `sizes` of the markup: the image spans the viewport. A page whose layout
# gives the image less room should set `sizes` to that width.
MARKUP_SIZES = "100vw"

FORMAT_NAMES = {"jpg": "JPEG", "png": "PNG", "webp": "WebP", "avif": "AVIF"}

PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Preview of $key</title>
<link rel="icon" href="data:,">
<style>
body { font-family: system-ui, sans-serif; margin: 1.5rem; line-height: 1.4; }
figure { margin: 0 0 2rem; }
figure img { display: block; max-width: 100%; height: auto; background: #ddd; }
figcaption { margin-top: 0.3rem; }
textarea { width: 100%; font-family: monospace; }
</style>
</head>
<body>
<h1>Preview of <code>$key</code></h1>
<p id="source">Source: $source_width × $source_height pixels$orientation, $source_format, $source_bytes bytes.</p>
$notes
<p>Each variant below was encoded for this page with the current settings.
Its time is the wall-clock time of one <code>make_variant</code> call in a resize
thread: decoding the source bytes already in memory (with shrink-on-load),
resizing and encoding. It excludes the S3 fetch and the store write, and it
varies with the load on the machine. A variant stored earlier with other
settings keeps its old bytes, so an image below can differ from its numbers
until the variant is made again (<code>resize-proxy backfill --force</code>).</p>
$sections
<h2>Markup</h2>
<p>Set <code>sizes</code> to the width that the layout gives the image, and
write the <code>alt</code> text. Widths above the source's own give the same
image, so each image size is listed once.</p>
<textarea id="markup" readonly rows="$markup_rows" cols="100">$markup</textarea>
</body>
</html>
""")

SECTION = Template("""<h2>$format_name, $quality</h2>
$figures""")

FIGURE = Template("""<figure>
<img src="$url" width="$width" height="$height" alt="$format_name variant at width $requested_width">
<figcaption><a href="$url">$url</a>: $width × $height pixels, $size bytes, $milliseconds ms</figcaption>
</figure>
""")


@dataclass(frozen=True)
class PreviewVariant:
    # Percent-encoded URL path of the variant, for example `/r/trips/p-720.webp`.
    url: str
    format: str
    requested_width: int
    width: int
    height: int
    size_bytes: int
    encode_seconds: float


@dataclass(frozen=True)
class SourceInfo:
    format: str
    width: int
    height: int
    # EXIF orientation, 1 to 8; 1 is upright.
    orientation: int


async def serve_preview(request: Request) -> HTMLResponse:
    """Build the preview page of the source key in the URL path.

    Raises NotFound when the page is off or the source is missing, InvalidPath
    for a malformed key, UnsupportedFormat for a key or bytes that are not an
    image source, and the pipeline's and the store's errors otherwise.
    """
    settings: Settings = request.app.state.settings
    if not settings.preview:
        raise NotFound("the preview page is off; set PROXY_PREVIEW=1 to turn it on")

    key = _source_key(request)
    variant_urls = _variant_urls(key, settings)
    service: VariantService = request.app.state.variants

    running = getattr(request.app.state, "previews_running", 0)
    if running >= MAX_RUNNING_PREVIEWS:
        raise Overloaded("another preview page is being built; try again in a second")
    request.app.state.previews_running = running + 1
    try:
        source = await _fetch_source(service, key, settings)
        base = key.rpartition(".")[0]
        sibling_keys = await service.store.list_keys(base + ".")
        loop = asyncio.get_running_loop()
        info = await loop.run_in_executor(service.executor, _read_source_info, source.body)
        variants = []
        # One at a time, so that no encode of this page slows down another.
        for url, output_format, width in variant_urls:
            encoded, seconds = await loop.run_in_executor(
                service.executor, _timed_make_variant, source.body, width, output_format, settings
            )
            variants.append(
                PreviewVariant(url, output_format, width, encoded.width, encoded.height, len(encoded.body), seconds)
            )
    finally:
        request.app.state.previews_running -= 1

    page = _render_page(key, source, info, variants, _other_sources(key, sibling_keys, settings), settings)
    headers = {
        "Cache-Control": "no-store",
        # Defence in depth besides the escaping: the page runs no script at all.
        # `data:` allows its empty icon, which saves a /favicon.ico request.
        "Content-Security-Policy": "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'",
    }
    return HTMLResponse(page, headers=headers)


def _source_key(request: Request) -> str:
    """Check the source key in the URL with the rules of variant paths, and return it."""
    settings: Settings = request.app.state.settings
    raw_path = request.scope.get("raw_path") or quote(request.scope["path"]).encode()
    if not raw_path.startswith(ROUTE_PREFIX + b"/") or raw_path == ROUTE_PREFIX + b"/":
        raise NotFound(f"no source key; preview URLs look like /preview/{settings.source_prefix}<folders>/<name>.<ext>")
    # The checks of variant paths: 400 for `..`, `.` or empty segments, control
    # characters, backslashes, invalid UTF-8 and keys over 1024 bytes.
    key = decode_key(raw_path[len(ROUTE_PREFIX) :])

    if not key.startswith(settings.source_prefix):
        raise NotFound(f"{_show(key)} is not under the source prefix {settings.source_prefix!r}")
    stem, dot, extension = key.rpartition("/")[2].rpartition(".")
    if not stem or not dot or extension.lower() not in SOURCE_EXTENSIONS:
        raise UnsupportedFormat(
            f"{_show(key)} does not end in a source extension, so no variant URL finds it; "
            f"use one of .{', .'.join(SOURCE_EXTENSIONS)}"
        )
    return key


def _variant_urls(key: str, settings: Settings) -> list[tuple[str, str, int]]:
    """List (URL path, format, width) of every variant of `key`, formats first.

    Each URL is checked by the variant route's own parser, so a URL on the page
    is one that the route accepts and resolves to this source's stem.
    """
    relative_base = key[len(settings.source_prefix) :].rpartition(".")[0]
    urls = []
    for output_format in settings.formats:
        for width in settings.widths:
            url = quote(f"/{settings.variant_prefix}{relative_base}-{width}.{output_format}")
            parse_variant_path(url.encode("ascii"), settings)
            urls.append((url, output_format, width))
    return urls


async def _fetch_source(service: VariantService, key: str, settings: Settings) -> StoredObject:
    max_bytes = int(settings.max_source_mb * 1024 * 1024)
    try:
        source = await service.store.get(key, max_bytes=max_bytes, need_etag=False)
    except ObjectTooLarge as error:
        raise SourceTooLarge(
            f"source {_show(key)} is {error.size} bytes, over the limit of "
            f"{settings.max_source_mb:g} MiB (PROXY_MAX_SOURCE_MB)"
        ) from None
    if source is None:
        raise NotFound(f"source {_show(key)} not found")
    return source


def _read_source_info(data: bytes) -> SourceInfo:
    """Read the format and size from the header; raises UnsupportedFormat for non-images."""
    source_format = imaging.detect_format(data)
    header = pyvips.Image.new_from_buffer(data, "")
    orientation = header.get("orientation") if header.get_typeof("orientation") != 0 else 1
    return SourceInfo(source_format, header.width, header.height, orientation)


def _timed_make_variant(
    data: bytes, width: int, output_format: str, settings: Settings
) -> tuple[imaging.EncodedImage, float]:
    """Run make_variant and return its result with its wall-clock time in seconds."""
    start = time.perf_counter()
    encoded = imaging.make_variant(data, width, output_format, settings)
    return encoded, time.perf_counter() - start


def _other_sources(key: str, sibling_keys: list[str], settings: Settings) -> dict[str, str]:
    """Map each format whose variant URLs resolve to another source key to that key.

    The variant route prefers a source with the variant's own extension, so
    `p.webp` next to `p.jpg` is the source of the WebP variants of both.
    """
    base = key.rpartition(".")[0]
    others = {}
    for output_format in settings.formats:
        chosen = choose_source(sibling_keys, base, output_format)
        if chosen is not None and chosen != key:
            others[output_format] = chosen
    return others


def _render_page(
    key: str,
    source: StoredObject,
    info: SourceInfo,
    variants: list[PreviewVariant],
    other_sources: dict[str, str],
    settings: Settings,
) -> str:
    notes = [
        f'<p class="note">The {FORMAT_NAMES[output_format]} variant URLs are made from '
        f"<code>{_escape(other)}</code>, not from this source, because the variant route "
        "prefers a source with the variant's extension. The numbers below are for this source.</p>"
        for output_format, other in other_sources.items()
    ]
    sections = [
        SECTION.substitute(
            format_name=FORMAT_NAMES[output_format],
            quality=_escape(_quality(output_format, settings)),
            figures="".join(_figure(variant) for variant in variants if variant.format == output_format),
        )
        for output_format in settings.formats
    ]
    markup = _markup(variants, settings)
    orientation = ""
    if info.orientation != 1:
        orientation = f" as stored (EXIF orientation {info.orientation}, which the variants apply)"
    return PAGE.substitute(
        key=_escape(key),
        source_width=info.width,
        source_height=info.height,
        orientation=orientation,
        source_format=_escape(info.format.upper()),
        source_bytes=f"{len(source.body):,}",
        notes="\n".join(notes),
        sections="\n".join(sections),
        markup=_escape(markup),
        markup_rows=markup.count("\n") + 1,
    )


def _figure(variant: PreviewVariant) -> str:
    return FIGURE.substitute(
        url=_escape(variant.url),
        format_name=FORMAT_NAMES[variant.format],
        requested_width=variant.requested_width,
        width=variant.width,
        height=variant.height,
        size=f"{variant.size_bytes:,}",
        milliseconds=f"{variant.encode_seconds * 1000:.1f}",
    )


def _quality(output_format: str, settings: Settings) -> str:
    if output_format == "jpg":
        return f"quality {settings.jpeg_quality} (PROXY_JPEG_QUALITY)"
    if output_format == "webp":
        return f"quality {settings.webp_quality} (PROXY_WEBP_QUALITY)"
    if output_format == "avif":
        return (
            f"quality {settings.avif_quality} (PROXY_AVIF_QUALITY), "
            f"effort {settings.avif_effort} (PROXY_AVIF_EFFORT)"
        )
    return f"compression level {settings.png_compression} (PROXY_PNG_COMPRESSION)"


def _markup(variants: list[PreviewVariant], settings: Settings) -> str:
    """Write `<picture>` markup: AVIF and WebP sources, then an `<img>` fallback.

    The fallback is JPEG, else PNG, else the last of PROXY_FORMATS.
    """
    fallback_format = next((name for name in ("jpg", "png") if name in settings.formats), settings.formats[-1])
    lines = ["<picture>"]
    for output_format in ("avif", "webp"):
        if output_format in settings.formats and output_format != fallback_format:
            lines.append(f'  <source type="{imaging.CONTENT_TYPES[output_format]}" sizes="{MARKUP_SIZES}"')
            lines.append(f'          srcset="{_srcset(variants, output_format, "                  ")}">')

    fallback = [variant for variant in variants if variant.format == fallback_format]
    # Browsers without srcset support load `src`; the largest variant looks sharp at any size.
    largest = fallback[-1]
    lines.append(f'  <img src="{html.escape(largest.url)}" sizes="{MARKUP_SIZES}"')
    lines.append(f'       srcset="{_srcset(variants, fallback_format, "               ")}"')
    lines.append(f'       width="{largest.width}" height="{largest.height}" alt="">')
    lines.append("</picture>")
    return "\n".join(lines)


def _srcset(variants: list[PreviewVariant], output_format: str, indent: str) -> str:
    """Join the candidates of one format, each image size once, with its real width.

    A source narrower than some widths gives the same image for each of them, and
    a srcset with two candidates of the same width is invalid.
    """
    candidates = []
    seen_widths = set()
    for variant in variants:
        if variant.format != output_format or variant.width in seen_widths:
            continue
        seen_widths.add(variant.width)
        candidates.append(f"{html.escape(variant.url)} {variant.width}w")
    return f",\n{indent}".join(candidates)


def _escape(text: str) -> str:
    return html.escape(text, quote=True)


def _show(key: str) -> str:
    """Quote a key for an error message, shortened so a long key stays readable."""
    if len(key) > 80:
        key = key[:77] + "..."
    return repr(key)
