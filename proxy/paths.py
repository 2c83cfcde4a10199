"""Parse variant URLs into store keys.

`/r/trips/asia/img_01-720.jpg` names the variant key `r/trips/asia/img_01-720.jpg`,
made at width 720 in JPEG from the source `original/trips/asia/img_01.<any ext>`.
"""

import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from .errors import InvalidPath, NotFound
from .settings import OUTPUT_FORMATS, Settings

# S3 rejects keys longer than 1024 bytes of UTF-8.
MAX_KEY_BYTES = 1024

# Only the last `-<digits>` before the extension is the width, so the stem is greedy.
VARIANT_NAME = re.compile(r"^(?P<stem>.+)-(?P<width>[0-9]+)\.(?P<ext>[^.]+)$")

# Source extensions that the lookup accepts, in order of preference when one stem
# has several sources. Letter case is ignored.
SOURCE_EXTENSIONS = (
    "jpg", "jpeg", "png", "webp", "avif", "tif", "tiff", "gif", "heic", "heif", "svg",
)


@dataclass(frozen=True)
class VariantRequest:
    key: str
    # Source key without its extension, for example `original/a/b/photo`.
    source_base: str
    # Extension as written in the URL; the first source extension tried.
    ext: str
    # Output format: `jpg` for both `.jpg` and `.jpeg`.
    format: str
    width: int


def parse_variant_path(raw_path: bytes, settings: Settings) -> VariantRequest:
    """Check a raw, still percent-encoded URL path and map it to store keys.

    Raises InvalidPath (400) for a malformed path and NotFound (404) for a width
    or format that is not offered.
    """
    key = decode_key(raw_path)

    if not key.startswith(settings.variant_prefix):
        raise NotFound(f"{_show(key)} is not under the variant prefix {settings.variant_prefix!r}")
    rel_path = key[len(settings.variant_prefix) :]
    directory, _, name = rel_path.rpartition("/")

    match = VARIANT_NAME.match(name)
    if match is None:
        raise InvalidPath(
            f"{_show(name)} is not a variant name; expected <name>-<width>.<ext>, "
            "for example photo-720.jpg"
        )
    stem, width_text, ext = match.group("stem", "width", "ext")

    if ext not in OUTPUT_FORMATS:
        raise NotFound(f"output format {ext!r} is not offered; use one of {', '.join(OUTPUT_FORMATS)}")
    # A width with leading zeros would be a second key for the same variant.
    width = int(width_text)
    if str(width) != width_text or width not in settings.widths:
        allowed = ", ".join(str(w) for w in settings.widths)
        raise NotFound(f"width {width_text} is not allowed; use one of {allowed}")

    source_dir = f"{directory}/" if directory else ""
    source_base = f"{settings.source_prefix}{source_dir}{stem}"
    # With the whole bucket as the source prefix, `/r/r/a-720-360.jpg` would name
    # the variant `r/a-720.jpg` as its source. Variants are never sources.
    if source_base.startswith(settings.variant_prefix):
        raise NotFound(
            f"source {source_base}.* lies under the variant prefix "
            f"{settings.variant_prefix!r}, and variants are not resized again"
        )
    return VariantRequest(
        key=key,
        source_base=source_base,
        ext=ext,
        format="jpg" if ext == "jpeg" else ext,
        width=width,
    )


def decode_key(raw_path: bytes) -> str:
    """Turn a raw URL path into a store key, rejecting anything that could escape it.

    The checks run on the decoded bytes, so `%2e%2e` and `%2F` are judged like `..`
    and `/`. The order matters. The length is bounded first, so no other check
    works on a huge input. The bytes must be UTF-8 before they are read as text.
    Control characters, backslashes and `.`, `..` or empty segments come last:
    a local folder store would resolve those to another file.
    """
    # Each key byte takes at most three path bytes (`%XX`), after the leading '/'.
    if len(raw_path) > 3 * MAX_KEY_BYTES + 1:
        raise InvalidPath(
            f"path is {len(raw_path)} bytes, so its key is over the S3 limit of "
            f"{MAX_KEY_BYTES} bytes; shorten it"
        )
    decoded = unquote_to_bytes(raw_path)
    if not decoded.startswith(b"/"):
        raise InvalidPath("path must start with '/'")
    key_bytes = decoded[1:]
    if not key_bytes:
        raise NotFound("no variant here; variant URLs look like /r/<folders>/<name>-<width>.<ext>")
    if len(key_bytes) > MAX_KEY_BYTES:
        raise InvalidPath(
            f"key is {len(key_bytes)} bytes, over the S3 limit of {MAX_KEY_BYTES}; shorten it"
        )

    try:
        key = key_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPath("path is not valid UTF-8 after percent-decoding") from None

    if any(unicodedata.category(char) == "Cc" for char in key):
        raise InvalidPath("path contains a control character")
    if "\\" in key:
        raise InvalidPath("path contains a backslash; use '/' between folders")
    segments = key.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        raise InvalidPath("path contains an empty, '.' or '..' segment")
    return key


def _show(text: str) -> str:
    """Quote a path for an error message, shortened so a long path stays readable."""
    if len(text) > 80:
        text = text[:77] + "..."
    return repr(text)
