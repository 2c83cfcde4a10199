"""Unit tests of parse_variant_path: URL paths to store keys, and the paths it rejects."""

from pathlib import Path

import pytest

from proxy.errors import InvalidPath, NotFound
from proxy.paths import MAX_KEY_BYTES, parse_variant_path
from proxy.settings import Settings


@pytest.fixture
def settings(settings_for, tmp_path: Path) -> Settings:
    return settings_for(storage=str(tmp_path))


# Mapping


def test_basic_path_maps_to_keys(settings: Settings):
    request = parse_variant_path(b"/r/a/b/photo-720.jpg", settings)

    assert request.key == "r/a/b/photo-720.jpg"
    assert request.source_base == "original/a/b/photo"
    assert request.ext == "jpg"
    assert request.format == "jpg"
    assert request.width == 720


def test_path_at_prefix_root_maps(settings: Settings):
    request = parse_variant_path(b"/r/photo-360.webp", settings)

    assert request.key == "r/photo-360.webp"
    assert request.source_base == "original/photo"
    assert request.format == "webp"
    assert request.width == 360


def test_only_last_number_is_width(settings: Settings):
    request = parse_variant_path(b"/r/img-800-360.jpg", settings)

    assert request.source_base == "original/img-800"
    assert request.width == 360


def test_dots_in_stem_are_kept(settings: Settings):
    request = parse_variant_path(b"/r/v1.2/photo.final-720.png", settings)

    assert request.source_base == "original/v1.2/photo.final"
    assert request.ext == "png"


def test_jpeg_extension_maps_to_jpg(settings: Settings):
    request = parse_variant_path(b"/r/photo-720.jpeg", settings)

    assert request.key == "r/photo-720.jpeg"
    assert request.ext == "jpeg"
    assert request.format == "jpg"


@pytest.mark.parametrize("ext", ["jpg", "png", "webp", "avif"])
def test_every_output_format_parses(settings: Settings, ext: str):
    request = parse_variant_path(f"/r/photo-720.{ext}".encode(), settings)

    assert request.format == ext


def test_percent_encoded_utf8_decodes(settings: Settings):
    request = parse_variant_path(b"/r/trips/%C3%89t%C3%A9%2001-720.jpg", settings)

    assert request.key == "r/trips/Été 01-720.jpg"
    assert request.source_base == "original/trips/Été 01"


def test_raw_utf8_bytes_decode(settings: Settings):
    request = parse_variant_path("/r/ü-720.jpg".encode(), settings)

    assert request.key == "r/ü-720.jpg"


def test_encoded_slash_splits_folders(settings: Settings):
    # `%2F` decodes to `/`, so it names the same key as a plain slash.
    request = parse_variant_path(b"/r/a%2Fphoto-720.jpg", settings)

    assert request.key == "r/a/photo-720.jpg"
    assert request.source_base == "original/a/photo"


def test_plus_stays_literal(settings: Settings):
    request = parse_variant_path(b"/r/a+b-720.jpg", settings)

    assert request.key == "r/a+b-720.jpg"


# Widths and formats that are not offered


@pytest.mark.parametrize("width", ["721", "100", "99999999999999999999"])
def test_width_not_allowed_not_found(settings: Settings, width: str):
    with pytest.raises(NotFound):
        parse_variant_path(f"/r/photo-{width}.jpg".encode(), settings)


def test_leading_zero_width_not_found(settings: Settings):
    # `0720` would be a second key for the 720 variant.
    with pytest.raises(NotFound):
        parse_variant_path(b"/r/photo-0720.jpg", settings)


def test_width_zero_not_found(settings: Settings):
    with pytest.raises(NotFound):
        parse_variant_path(b"/r/photo-0.jpg", settings)


@pytest.mark.parametrize("ext", ["gif", "bmp", "tif", "heic", "svg", "JPG", "Jpeg", "WEBP"])
def test_unknown_extension_not_found(settings: Settings, ext: str):
    with pytest.raises(NotFound):
        parse_variant_path(f"/r/photo-720.{ext}".encode(), settings)


def test_custom_widths_apply(settings_for, tmp_path: Path):
    settings = settings_for(storage=str(tmp_path), widths="100,250")

    assert parse_variant_path(b"/r/photo-250.jpg", settings).width == 250
    with pytest.raises(NotFound):
        parse_variant_path(b"/r/photo-720.jpg", settings)


# Names without a width


@pytest.mark.parametrize(
    "path",
    [
        b"/r/photo.jpg",
        b"/r/photo-.jpg",
        b"/r/-720.jpg",
        b"/r/photo-720",
        b"/r/photo-720.",
        b"/r/photo-72a.jpg",
        b"/r/photo_720.jpg",
        # Arabic-Indic digits are digits to str.isdigit but not to the width pattern.
        "/r/photo-٧٢٠.jpg".encode(),
    ],
)
def test_name_without_width_invalid(settings: Settings, path: bytes):
    with pytest.raises(InvalidPath):
        parse_variant_path(path, settings)


# Prefixes


@pytest.mark.parametrize("path", [b"/original/photo-720.jpg", b"/photo-720.jpg", b"/r", b"/rr/photo-720.jpg", b"/R/photo-720.jpg"])
def test_outside_variant_prefix_not_found(settings: Settings, path: bytes):
    with pytest.raises(NotFound):
        parse_variant_path(path, settings)


def test_custom_variant_prefix_maps(settings_for, tmp_path: Path):
    settings = settings_for(storage=str(tmp_path), variant_prefix="img/")

    request = parse_variant_path(b"/img/a/photo-720.jpg", settings)

    assert request.key == "img/a/photo-720.jpg"
    assert request.source_base == "original/a/photo"


def test_custom_variant_prefix_rejects_default(settings_for, tmp_path: Path):
    settings = settings_for(storage=str(tmp_path), variant_prefix="img/")

    with pytest.raises(NotFound):
        parse_variant_path(b"/r/a/photo-720.jpg", settings)


def test_empty_source_prefix_maps(settings_for, tmp_path: Path):
    settings = settings_for(storage=str(tmp_path), source_prefix="")

    nested = parse_variant_path(b"/r/a/b/photo-720.jpg", settings)
    top = parse_variant_path(b"/r/photo-720.jpg", settings)

    assert nested.source_base == "a/b/photo"
    assert top.source_base == "photo"


def test_nested_prefixes_map(settings_for, tmp_path: Path):
    settings = settings_for(storage=str(tmp_path), variant_prefix="cache/sized/", source_prefix="media/src/")

    request = parse_variant_path(b"/cache/sized/a/photo-720.jpg", settings)

    assert request.key == "cache/sized/a/photo-720.jpg"
    assert request.source_base == "media/src/a/photo"


# Paths that could reach another key or file


def test_dot_dot_segment_invalid(settings: Settings):
    # Path traversal: `..` would climb out of the variant prefix in a local store.
    with pytest.raises(InvalidPath):
        parse_variant_path(b"/r/../original/secret-720.jpg", settings)


def test_encoded_dot_dot_invalid(settings: Settings):
    # Path traversal hidden by percent-encoding, so a filter on the raw path misses it.
    with pytest.raises(InvalidPath):
        parse_variant_path(b"/r/%2e%2e/original/secret-720.jpg", settings)


def test_upper_encoded_dot_dot_invalid(settings: Settings):
    # Path traversal with upper-case hex digits, which a case-sensitive filter would miss.
    with pytest.raises(InvalidPath):
        parse_variant_path(b"/r/%2E%2E/original/secret-720.jpg", settings)


def test_mixed_encoded_dot_dot_invalid(settings: Settings):
    # Path traversal with one dot encoded and one plain.
    with pytest.raises(InvalidPath):
        parse_variant_path(b"/r/a/.%2e/%2e./photo-720.jpg", settings)


def test_trailing_dot_dot_invalid(settings: Settings):
    # Path traversal in the last segment, which then has no file name.
    with pytest.raises(InvalidPath):
        parse_variant_path(b"/r/a/..", settings)


def test_dot_segment_invalid(settings: Settings):
    # Key aliasing: `/r/./a` would name the same file as `/r/a` locally but another S3 key.
    with pytest.raises(InvalidPath):
        parse_variant_path(b"/r/./photo-720.jpg", settings)


def test_double_slash_invalid(settings: Settings):
    # Key aliasing: an empty segment collapses on disk but not in S3.
    with pytest.raises(InvalidPath):
        parse_variant_path(b"/r//photo-720.jpg", settings)


def test_leading_double_slash_invalid(settings: Settings):
    # Absolute path: `//` at the start would leave a key that starts with '/'.
    with pytest.raises(InvalidPath):
        parse_variant_path(b"//r/photo-720.jpg", settings)


def test_encoded_double_slash_invalid(settings: Settings):
    # Key aliasing hidden by percent-encoding the slashes.
    with pytest.raises(InvalidPath):
        parse_variant_path(b"/r/a%2F%2Fphoto-720.jpg", settings)


def test_trailing_slash_invalid(settings: Settings):
    # Empty last segment: a folder, not a file, would be named.
    with pytest.raises(InvalidPath):
        parse_variant_path(b"/r/photo-720.jpg/", settings)


def test_backslash_invalid(settings: Settings):
    # Windows-style traversal: some servers and tools read `\` as a folder separator.
    with pytest.raises(InvalidPath):
        parse_variant_path(b"/r/..\\original\\secret-720.jpg", settings)


def test_encoded_backslash_invalid(settings: Settings):
    # Windows-style traversal hidden by percent-encoding the backslash.
    with pytest.raises(InvalidPath):
        parse_variant_path(b"/r/..%5Coriginal%5Csecret-720.jpg", settings)


def test_nul_byte_invalid(settings: Settings):
    # NUL injection: C file APIs end the name at `%00`, dropping what follows.
    with pytest.raises(InvalidPath):
        parse_variant_path(b"/r/photo-720.jpg%00.png", settings)


def test_newline_invalid(settings: Settings):
    # Log and header injection through a line feed in the key.
    with pytest.raises(InvalidPath):
        parse_variant_path(b"/r/photo%0a-720.jpg", settings)


def test_carriage_return_invalid(settings: Settings):
    # Header splitting through a carriage return in the key.
    with pytest.raises(InvalidPath):
        parse_variant_path(b"/r/photo%0d-720.jpg", settings)


def test_delete_character_invalid(settings: Settings):
    # Terminal escape abuse: DEL and other control characters garble logs.
    with pytest.raises(InvalidPath):
        parse_variant_path(b"/r/photo%7f-720.jpg", settings)


def test_c1_control_invalid(settings: Settings):
    # Log injection with U+0085 NEXT LINE, a line break to some log readers.
    with pytest.raises(InvalidPath):
        parse_variant_path(b"/r/photo%C2%85-720.jpg", settings)


def test_invalid_utf8_invalid(settings: Settings):
    # Encoding confusion: bytes that are not UTF-8 have no single text key.
    with pytest.raises(InvalidPath):
        parse_variant_path(b"/r/photo%ff-720.jpg", settings)


def test_overlong_utf8_dot_invalid(settings: Settings):
    # Overlong UTF-8 `%c0%ae` is a dot to lax decoders, so it could smuggle `..`.
    with pytest.raises(InvalidPath):
        parse_variant_path(b"/r/%c0%ae%c0%ae/photo-720.jpg", settings)


def test_utf8_surrogate_invalid(settings: Settings):
    # Encoding confusion: an encoded UTF-16 surrogate is not valid UTF-8.
    with pytest.raises(InvalidPath):
        parse_variant_path(b"/r/photo%ED%A0%80-720.jpg", settings)


def test_double_encoding_stays_literal(settings: Settings):
    # Double encoding: `%252e` decodes once to the literal text `%2e`, never to a dot.
    request = parse_variant_path(b"/r/%252e%252e/photo-720.jpg", settings)

    assert request.key == "r/%2e%2e/photo-720.jpg"


def test_path_without_slash_invalid(settings: Settings):
    with pytest.raises(InvalidPath):
        parse_variant_path(b"r/photo-720.jpg", settings)


# Key length: S3 rejects keys over 1024 bytes of UTF-8.


def key_of_length(length: int, filler: str = "a") -> str:
    """A variant key of exactly `length` UTF-8 bytes."""
    fixed = len("r/-720.jpg")
    filler_bytes = len(filler.encode())
    count, rest = divmod(length - fixed, filler_bytes)
    return "r/" + filler * count + "a" * rest + "-720.jpg"


def percent_encode_all(key: str) -> bytes:
    return b"/" + "".join(f"%{byte:02X}" for byte in key.encode()).encode()


def test_key_of_max_bytes_accepted(settings: Settings):
    key = key_of_length(MAX_KEY_BYTES)

    request = parse_variant_path(b"/" + key.encode(), settings)

    assert len(request.key.encode()) == 1024


def test_key_over_max_bytes_invalid(settings: Settings):
    # Oversized key: S3 would reject the write, after the image was made.
    with pytest.raises(InvalidPath):
        parse_variant_path(b"/" + key_of_length(MAX_KEY_BYTES + 1).encode(), settings)


def test_encoded_key_of_max_bytes_accepted(settings: Settings):
    # Every byte percent-encoded triples the path, which must still be accepted.
    key = key_of_length(MAX_KEY_BYTES)

    request = parse_variant_path(percent_encode_all(key), settings)

    assert request.key == key


def test_encoded_key_over_max_bytes_invalid(settings: Settings):
    # Oversized key hidden by percent-encoding every byte.
    with pytest.raises(InvalidPath):
        parse_variant_path(percent_encode_all(key_of_length(MAX_KEY_BYTES + 1)), settings)


def test_multibyte_key_of_max_bytes_accepted(settings: Settings):
    # The limit counts UTF-8 bytes, not characters: `é` is two bytes.
    key = key_of_length(MAX_KEY_BYTES, filler="é")

    request = parse_variant_path(percent_encode_all(key), settings)

    assert len(request.key.encode()) == 1024
    assert len(request.key) < 1024


def test_multibyte_key_over_max_bytes_invalid(settings: Settings):
    # Oversized key that is under the limit counted in characters.
    key = key_of_length(MAX_KEY_BYTES + 1, filler="é")

    with pytest.raises(InvalidPath):
        parse_variant_path(percent_encode_all(key), settings)


def test_huge_path_invalid(settings: Settings):
    # Resource exhaustion: a megabyte path is rejected before it is decoded.
    with pytest.raises(InvalidPath) as raised:
        parse_variant_path(b"/r/" + b"%41" * 400_000 + b"-720.jpg", settings)

    assert "over the S3 limit of 1024 bytes" in raised.value.message


# Error messages


def test_width_error_lists_allowed_widths(settings: Settings):
    with pytest.raises(NotFound) as raised:
        parse_variant_path(b"/r/photo-721.jpg", settings)

    assert "721" in raised.value.message
    assert "360, 720, 1200, 2200" in raised.value.message


def test_long_name_error_is_shortened(settings: Settings):
    with pytest.raises(InvalidPath) as raised:
        parse_variant_path(b"/r/" + b"a" * 500 + b".jpg", settings)

    assert len(raised.value.message) < 200
