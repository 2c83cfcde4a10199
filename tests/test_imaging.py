"""The libvips pipeline on generated images and a real photograph."""

import io
import math

import pytest
import pyvips
from conftest import decode, make_image
from PIL import Image

from proxy import imaging
from proxy.errors import UndecodableSource, UnsupportedFormat


@pytest.fixture
def settings(settings_for, tmp_path):
    return settings_for(storage=str(tmp_path))


def test_photo_resized_to_exact_width(photo, settings):
    source = decode(photo)

    result = imaging.make_variant(photo, 720, "jpg", settings)

    image = decode(result.body)
    assert (image.width, image.height) == (720, round(source.height * 720 / source.width))
    assert (result.width, result.height) == (image.width, image.height)
    assert result.content_type == "image/jpeg"


@pytest.mark.parametrize(("size", "expected"), [((900, 1), (360, 1)), ((1, 900), (1, 900)), ((449, 3), (360, 2))])
def test_thin_image_keeps_every_side(settings, size, expected):
    source = make_image(*size, ".png")

    result = imaging.make_variant(source, 360, "png", settings)

    image = decode(result.body)
    assert (image.width, image.height) == expected


def test_narrow_image_not_enlarged(settings):
    result = imaging.make_variant(make_image(100, 80), 720, "webp", settings)

    assert (result.width, result.height) == (100, 80)


def test_exif_orientation_applied(settings):
    # A landscape image whose EXIF orientation is "rotate 90° clockwise" must come out portrait.
    landscape = pyvips.Image.new_from_buffer(make_image(800, 400), "").copy()
    landscape.set_type(pyvips.GValue.gint_type, "orientation", 6)
    source = landscape.jpegsave_buffer(Q=90)

    result = imaging.make_variant(source, 360, "jpg", settings)

    image = decode(result.body)
    assert (image.width, image.height) == (360, 720)
    assert image.get_typeof("orientation") == 0 or image.get("orientation") == 1


def test_alpha_flattened_onto_white_for_jpeg(settings):
    # An opaque black square on a transparent background.
    alpha = pyvips.Image.black(400, 400).draw_rect(255, 100, 100, 200, 200, fill=True)
    source = pyvips.Image.black(400, 400, bands=3).copy(interpretation="srgb").bandjoin(alpha).pngsave_buffer()

    result = imaging.make_variant(source, 360, "jpg", settings)

    image = decode(result.body)
    assert image.bands == 3
    corner = image.crop(0, 0, 20, 20).avg()
    centre = image.crop(170, 170, 20, 20).avg()
    assert corner > 245, "transparent parts must become white"
    assert centre < 10, "the opaque black must stay black"


def test_alpha_kept_for_png_and_webp(settings):
    alpha = pyvips.Image.black(400, 400).draw_rect(255, 100, 100, 200, 200, fill=True)
    source = pyvips.Image.black(400, 400, bands=3).copy(interpretation="srgb").bandjoin(alpha).pngsave_buffer()

    for output_format in ("png", "webp"):
        image = decode(imaging.make_variant(source, 360, output_format, settings).body)
        assert image.hasalpha(), output_format
        assert image.extract_band(3).crop(0, 0, 20, 20).avg() < 5, output_format


def test_background_setting_used(settings_for, tmp_path):
    settings = settings_for(storage=str(tmp_path), background="ff0000")
    alpha = pyvips.Image.black(100, 100)
    source = pyvips.Image.black(100, 100, bands=3).copy(interpretation="srgb").bandjoin(alpha).pngsave_buffer()

    image = decode(imaging.make_variant(source, 360, "jpg", settings).body)

    red, green, blue = (image.extract_band(band).avg() for band in range(3))
    assert red > 240
    assert green < 15
    assert blue < 15


def test_sixteen_bit_png_becomes_eight_bit(settings):
    source = (pyvips.Image.xyz(300, 200)[0] * 200).cast("ushort")
    source = source.bandjoin([source, source]).copy(interpretation="rgb16").pngsave_buffer()

    for output_format in ("jpg", "png", "webp"):
        image = decode(imaging.make_variant(source, 360, output_format, settings).body)
        assert image.format == "uchar", output_format
        assert image.bands == 3, output_format


@pytest.mark.parametrize("output_format", ["jpg", "png", "webp", "avif"])
def test_grey_sources_work_in_every_format(settings, output_format):
    grey = pyvips.Image.xyz(300, 200)[0].cast("uchar").copy(interpretation="b-w")
    grey_alpha = grey.bandjoin_const(128).copy(interpretation="b-w")

    for source in (grey.pngsave_buffer(), grey_alpha.pngsave_buffer()):
        image = decode(imaging.make_variant(source, 360, output_format, settings).body)
        assert image.width == 300


def test_cmyk_jpeg_converted_to_srgb(settings):
    # Pure red in sRGB, converted to CMYK by libvips' built-in profile.
    red = pyvips.Image.black(200, 100, bands=3).new_from_image([255, 0, 0]).copy(interpretation="srgb")
    source = red.icc_export(output_profile="cmyk").jpegsave_buffer(Q=95)
    assert decode(source).interpretation == "cmyk"

    image = decode(imaging.make_variant(source, 360, "jpg", settings).body)

    assert image.bands == 3
    red_level, green_level, blue_level = (image.extract_band(band).avg() for band in range(3))
    assert red_level > 180
    assert green_level < 80
    assert blue_level < 80


@pytest.mark.parametrize(
    ("output_format", "width", "smaller", "larger"),
    [
        ("jpg", 720, {"jpeg_quality": "40"}, {"jpeg_quality": "95"}),
        ("webp", 720, {"webp_quality": "30"}, {"webp_quality": "95"}),
        # Effort trades encode time for size at the same quality.
        ("webp", 720, {"webp_effort": "6"}, {"webp_effort": "0"}),
        ("avif", 360, {"avif_quality": "20", "avif_effort": "0"}, {"avif_quality": "90", "avif_effort": "0"}),
    ],
)
def test_encoder_setting_changes_size(settings_for, tmp_path, photo, output_format, width, smaller, larger):
    small_settings = settings_for(storage=str(tmp_path), **smaller)
    large_settings = settings_for(storage=str(tmp_path), **larger)

    small = imaging.make_variant(photo, width, output_format, small_settings).body
    large = imaging.make_variant(photo, width, output_format, large_settings).body

    assert len(small) < len(large)


@pytest.mark.parametrize(
    ("suffix", "expected"),
    [(".jpg", "jpeg"), (".png", "png"), (".webp", "webp"), (".gif", "gif"), (".tif", "tiff"), (".avif", "heif")],
)
def test_format_detected_from_bytes(suffix, expected):
    assert imaging.detect_format(make_image(64, 48, suffix)) == expected


def test_non_image_rejected_as_unsupported(settings):
    with pytest.raises(UnsupportedFormat) as error:
        imaging.make_variant(b"%PDF-1.7 not an image" * 20, 360, "jpg", settings)

    assert "not an image" in error.value.message


def test_truncated_jpeg_rejected(photo, settings):
    truncated = photo[: len(photo) * 6 // 10]

    with pytest.raises(UndecodableSource) as error:
        imaging.make_variant(truncated, 360, "jpg", settings)

    assert "jpeg" in error.value.message


def uncompressed_tiff(width: int, height: int) -> bytes:
    """An uncompressed RGB TIFF written by Pillow, whose header comes before the strips."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, "TIFF", compression="raw")
    return buffer.getvalue()


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".gif", ".avif", ".tif"])
def test_truncated_source_undecodable_not_unsupported(settings, suffix):
    # Any source format cut short is damaged (422), never "not an image" (415).
    source = make_image(300, 200, suffix)
    truncated = source[: len(source) * 6 // 10]

    with pytest.raises(UndecodableSource):
        imaging.make_variant(truncated, 360, "jpg", settings)


def test_tiff_with_missing_strips_rejected(settings):
    # The header is intact and claims more strips than the file holds; decoding
    # must not fill the missing rows with black.
    source = uncompressed_tiff(300, 400)
    header = pyvips.Image.new_from_buffer(source[: len(source) // 2], "")
    assert header.height == 400

    with pytest.raises(UndecodableSource):
        imaging.make_variant(source[: len(source) // 2], 360, "jpg", settings)


def test_variant_over_webp_limit_rejected(settings):
    tall = make_image(400, 20000, ".png")

    with pytest.raises(UndecodableSource) as error:
        imaging.make_variant(tall, 360, "webp", settings)
    jpeg = imaging.make_variant(tall, 360, "jpg", settings)

    assert "16383" in error.value.message
    assert "360×18000" in error.value.message
    assert (jpeg.width, jpeg.height) == (360, 18000)


def test_several_jpeg_widths_use_scaled_decode(photo, settings, monkeypatch):
    source = decode(photo)
    shrinks = []
    original = pyvips.Image.new_from_buffer

    def recording(data, options, **kwargs):
        shrinks.append(kwargs.get("shrink"))
        return original(data, options, **kwargs)

    monkeypatch.setattr(pyvips.Image, "new_from_buffer", recording)
    width = source.width // 2 - 1

    results = imaging.make_variants(photo, [(width, "jpg"), (width // 3, "webp")], settings)

    # libjpeg decodes at 1/2 scale, the coarsest that is still wide enough.
    assert 2 in shrinks
    assert [result.width for result in results] == [width, width // 3]


def test_scaled_decode_close_to_single_thumbnail(photo, settings):
    width = decode(photo).width // 2 - 1

    together = imaging.make_variants(photo, [(width, "png"), (360, "png")], settings)[0]
    alone = imaging.make_variant(photo, width, "png", settings)

    difference = decode(together.body).cast("float") - decode(alone.body).cast("float")
    mean_squared_error = (difference * difference).avg()
    assert (together.width, together.height) == (alone.width, alone.height)
    # The decode at 1/2 scale replaces part of the Lanczos3 step, so some pixels
    # differ; above 40 dB of PSNR the two look the same.
    assert 10 * math.log10(255**2 / mean_squared_error) > 40


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_rotated_jpeg_widths_upright(settings, orientation):
    landscape = pyvips.Image.new_from_buffer(make_image(1600, 800), "").copy()
    landscape.set_type(pyvips.GValue.gint_type, "orientation", orientation)
    source = landscape.jpegsave_buffer(Q=90)

    results = imaging.make_variants(source, [(360, "jpg"), (180, "jpg")], settings)

    assert [(result.width, result.height) for result in results] == [(360, 720), (180, 360)]


def test_cmyk_jpeg_widths_in_srgb(settings):
    cmyk = pyvips.Image.new_from_buffer(make_image(1600, 800), "").icc_transform("cmyk")
    source = cmyk.jpegsave_buffer(Q=90)
    assert decode(source).interpretation == "cmyk"

    results = imaging.make_variants(source, [(720, "jpg"), (360, "webp")], settings)

    for result in results:
        image = decode(result.body)
        assert image.bands == 3
        assert image.interpretation == "srgb"


def test_truncated_jpeg_widths_rejected(photo, settings):
    truncated = photo[: len(photo) * 6 // 10]

    with pytest.raises(UndecodableSource, match="jpeg source could not be decoded"):
        imaging.make_variants(truncated, [(360, "jpg"), (720, "webp")], settings)


def test_cascaded_widths_close_to_direct_resize(photo, settings):
    sizes = [(2200, "png"), (1200, "png"), (720, "png"), (360, "png"), (360, "jpg")]
    decoded = imaging.decode_source(photo, sizes, settings)

    for width in (1200, 720, 360):
        cascaded = decoded.resized(width)
        direct = decoded.image.thumbnail_image(width, height=imaging.UNBOUNDED_HEIGHT, size="down")
        difference = cascaded.cast("float") - direct.cast("float")
        mean_squared_error = (difference * difference).avg()
        assert (cascaded.width, cascaded.height) == (direct.width, direct.height)
        # Each width comes from the next larger one, which changes some pixels
        # slightly. Above 45 dB of PSNR the two look the same.
        assert 10 * math.log10(255**2 / max(mean_squared_error, 1e-9)) > 45


def test_resized_width_shared_by_formats(photo, settings):
    decoded = imaging.decode_source(photo, [(1200, "jpg"), (720, "jpg"), (720, "webp")], settings)

    first = decoded.resized(720)

    assert decoded.resized(720) is first
    assert decoded.resized(decoded.image.width) is decoded.image
