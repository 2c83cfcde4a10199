"""Awkward source images, all generated in the test, through the libvips pipeline.

Each case runs through `imaging.make_variant`; a few also run end to end through
the app against moto's S3 server.
"""

import io
import zlib

import pytest
import pyvips
from conftest import decode, make_image, running_app
from PIL import Image, ImageCms

from proxy import imaging
from proxy.errors import SourceTooLarge, UndecodableSource, UnsupportedFormat

OUTPUT_FORMATS = ["jpg", "png", "webp", "avif"]


@pytest.fixture
def settings(settings_for, tmp_path):
    return settings_for(storage=str(tmp_path))


@pytest.fixture
def s3_settings(bucket, settings_for):
    return settings_for(storage=f"s3://{bucket}")


def variant_keys(s3, bucket) -> list[str]:
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="r/")
    return [item["Key"] for item in listing.get("Contents", [])]


def band_means(image: pyvips.Image) -> list[float]:
    return [image.extract_band(band).avg() for band in range(image.bands)]


def pillow_bytes(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


# EXIF orientation


def with_orientation(orientation: int) -> bytes:
    """An 800×400 gradient JPEG (red grows to the right, green downwards) with an EXIF orientation."""
    image = decode(make_image(800, 400)).copy()
    image.set_type(pyvips.GValue.gint_type, "orientation", orientation)
    return image.jpegsave_buffer(Q=90)


@pytest.mark.parametrize(
    ("orientation", "size", "top_left_red", "top_left_green"),
    [
        # 3 turns the image by 180°: the stored bottom-right corner comes first.
        (3, (360, 180), True, True),
        # 6 turns it 90° clockwise: the stored bottom-left corner comes first.
        (6, (360, 720), False, True),
        # 8 turns it 90° anticlockwise: the stored top-right corner comes first.
        (8, (360, 720), True, False),
    ],
)
def test_orientation_applied_before_resize(settings, orientation, size, top_left_red, top_left_green):
    result = imaging.make_variant(with_orientation(orientation), 360, "jpg", settings)

    image = decode(result.body)
    red, green, _ = band_means(image.crop(0, 0, 10, 10))
    assert (image.width, image.height) == size
    assert image.get_typeof("orientation") == 0
    assert (red > 200) == top_left_red
    assert (green > 200) == top_left_green


# CMYK JPEG


def cmyk_red_jpeg(**options) -> bytes:
    """A CMYK JPEG of pure red (0% cyan, 100% magenta and yellow), written by Pillow."""
    return pillow_bytes(Image.new("CMYK", (200, 100), (0, 255, 255, 0)), "JPEG", quality=95, **options)


def test_cmyk_jpeg_has_adobe_marker():
    source = cmyk_red_jpeg()

    # APP14 marker, its 14-byte length, then the "Adobe" identifier.
    assert b"\xff\xee\x00\x0eAdobe" in source
    assert decode(source).interpretation == "cmyk"


def test_cmyk_rgb_profile_source_carries_profile():
    source = cmyk_red_jpeg(icc_profile=srgb_profile())

    image = decode(source)
    assert image.interpretation == "cmyk"
    assert image.get_typeof("icc-profile-data") != 0


def srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@pytest.mark.parametrize("output_format", OUTPUT_FORMATS)
@pytest.mark.parametrize("profile", ["none", "rgb"], ids=["adobe", "rgb_profile"])
def test_cmyk_jpeg_stays_red(settings, output_format, profile):
    # A CMYK JPEG that embeds an RGB profile is a mismatch. libvips 8.18.7 still
    # converts it to red sRGB, so it is served rather than rejected with a 422.
    options = {"icc_profile": srgb_profile()} if profile == "rgb" else {}
    source = cmyk_red_jpeg(**options)

    image = decode(imaging.make_variant(source, 360, output_format, settings).body)

    red, green, blue = band_means(image)[:3]
    assert image.interpretation == "srgb"
    assert image.format == "uchar"
    assert red > 200
    assert green < 60
    assert blue < 60


async def test_cmyk_with_rgb_profile_served(s3, bucket, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/cmyk.jpg", Body=cmyk_red_jpeg(icc_profile=srgb_profile()))

    async with running_app(s3_settings) as client:
        response = await client.get("/r/cmyk-360.jpg")

    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert band_means(decode(response.content))[0] > 200


# 16-bit PNG


def sixteen_bit_png(with_alpha: bool) -> bytes:
    """A 300×200 16-bit red PNG. With alpha, the left half is opaque and the right half transparent."""
    red = (pyvips.Image.black(300, 200, bands=3) + [60000, 0, 0]).cast("ushort")
    if with_alpha:
        opaque_left = pyvips.Image.xyz(300, 200)[0] < 150
        red = red.bandjoin((opaque_left / 255 * 65535).cast("ushort"))
    return red.copy(interpretation="rgb16").pngsave_buffer()


@pytest.mark.parametrize("output_format", OUTPUT_FORMATS)
def test_sixteen_bit_rgb_red_in_eight_bits(settings, output_format):
    image = decode(imaging.make_variant(sixteen_bit_png(False), 360, output_format, settings).body)

    red, green, blue = band_means(image)[:3]
    assert image.format == "uchar"
    assert red > 220
    assert green < 10
    assert blue < 10


@pytest.mark.parametrize("output_format", OUTPUT_FORMATS)
def test_sixteen_bit_rgba_opaque_half_red(settings, output_format):
    image = decode(imaging.make_variant(sixteen_bit_png(True), 360, output_format, settings).body)

    red, green, blue = band_means(image.crop(0, 0, 140, 200))[:3]
    assert image.format == "uchar"
    assert red > 220
    assert green < 10
    assert blue < 10


def test_sixteen_bit_rgba_transparent_half_white_in_jpeg(settings):
    image = decode(imaging.make_variant(sixteen_bit_png(True), 360, "jpg", settings).body)

    assert image.bands == 3
    assert min(band_means(image.crop(160, 0, 140, 200))) > 250


@pytest.mark.parametrize("output_format", ["png", "webp", "avif"])
def test_sixteen_bit_rgba_alpha_kept(settings, output_format):
    image = decode(imaging.make_variant(sixteen_bit_png(True), 360, output_format, settings).body)

    assert image.bands == 4
    assert image.extract_band(3).crop(0, 0, 140, 200).avg() > 250
    assert image.extract_band(3).crop(160, 0, 140, 200).avg() < 5


# Logo on transparency


def black_logo_png() -> bytes:
    """A 400×400 RGBA PNG: an opaque black square in the middle, transparent around it."""
    alpha = pyvips.Image.black(400, 400).draw_rect(255, 100, 100, 200, 200, fill=True)
    black = pyvips.Image.black(400, 400, bands=3).copy(interpretation="srgb")
    return black.bandjoin(alpha).pngsave_buffer()


def test_logo_visible_on_white_in_jpeg(settings):
    image = decode(imaging.make_variant(black_logo_png(), 360, "jpg", settings).body)

    assert image.bands == 3
    assert image.crop(0, 0, 20, 20).avg() > 245
    assert image.crop(170, 170, 20, 20).avg() < 10


@pytest.mark.parametrize("output_format", ["png", "webp", "avif"])
def test_logo_alpha_kept(settings, output_format):
    image = decode(imaging.make_variant(black_logo_png(), 360, output_format, settings).body)

    alpha = image.extract_band(image.bands - 1)
    assert image.hasalpha()
    assert alpha.crop(0, 0, 20, 20).avg() < 5
    assert alpha.crop(170, 170, 20, 20).avg() > 250
    assert max(band_means(image.crop(170, 170, 20, 20))[:3]) < 10


# Grey PNG


def grey_png(with_alpha: bool) -> bytes:
    """A 300×200 grey PNG at level 100. With alpha, the whole image is opaque."""
    grey = (pyvips.Image.black(300, 200) + 100).cast("uchar")
    if with_alpha:
        grey = grey.bandjoin_const(255)
    return grey.copy(interpretation="b-w").pngsave_buffer()


@pytest.mark.parametrize("output_format", OUTPUT_FORMATS)
@pytest.mark.parametrize("with_alpha", [False, True], ids=["grey", "grey_alpha"])
def test_grey_png_keeps_level(settings, output_format, with_alpha):
    result = imaging.make_variant(grey_png(with_alpha), 360, output_format, settings)

    image = decode(result.body)
    colour = band_means(image)[: 3 if image.bands >= 3 else 1]
    assert (image.width, image.height) == (300, 200)
    assert all(abs(level - 100) < 6 for level in colour), colour


@pytest.mark.parametrize("output_format", ["png", "webp", "avif"])
def test_grey_alpha_png_keeps_alpha(settings, output_format):
    half = pyvips.Image.black(300, 200) + 100
    source = half.bandjoin_const(128).cast("uchar").copy(interpretation="b-w").pngsave_buffer()

    image = decode(imaging.make_variant(source, 360, output_format, settings).body)

    assert image.hasalpha()
    assert abs(image.extract_band(image.bands - 1).avg() - 128) < 6


def test_grey_alpha_png_flattened_for_jpeg(settings):
    # Level 0 at half opacity on white gives mid grey.
    source = pyvips.Image.black(300, 200).bandjoin_const(128).cast("uchar").copy(interpretation="b-w")

    image = decode(imaging.make_variant(source.pngsave_buffer(), 360, "jpg", settings).body)

    assert not image.hasalpha()
    assert abs(image.avg() - 127) < 6


# Animation: every variant is the first frame, as a still image.


def three_frame_animation(image_format: str) -> bytes:
    """A 120×80 animation of three frames: red, then green, then blue."""
    frames = [Image.new("RGB", (120, 80), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return pillow_bytes(frames[0], image_format, save_all=True, append_images=frames[1:], duration=100, loop=0)


@pytest.mark.parametrize("source_format", ["GIF", "WEBP"])
def test_animation_source_has_three_frames(source_format):
    assert decode(three_frame_animation(source_format)).get("n-pages") == 3


@pytest.mark.parametrize("output_format", OUTPUT_FORMATS)
@pytest.mark.parametrize("source_format", ["GIF", "WEBP"])
def test_animation_gives_first_frame(settings, output_format, source_format):
    result = imaging.make_variant(three_frame_animation(source_format), 360, output_format, settings)

    image = decode(result.body)
    red, green, blue = band_means(image)[:3]
    assert (image.width, image.height) == (120, 80)
    assert image.get_typeof("n-pages") == 0 or image.get("n-pages") == 1
    assert red > 240
    assert green < 15
    assert blue < 15


async def test_animated_gif_served_as_still(s3, bucket, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/anim.gif", Body=three_frame_animation("GIF"))

    async with running_app(s3_settings) as client:
        response = await client.get("/r/anim-360.webp")

    image = decode(response.content)
    assert response.status_code == 200
    assert image.get_typeof("n-pages") == 0 or image.get("n-pages") == 1
    assert band_means(image)[0] > 240


# Damaged and padded JPEG


async def test_cut_jpeg_422_and_not_stored(s3, bucket, s3_settings):
    source = make_image(600, 400)
    s3.put_object(Bucket=bucket, Key="original/cut.jpg", Body=source[: len(source) * 6 // 10])

    async with running_app(s3_settings) as client:
        response = await client.get("/r/cut-360.jpg")
        again = await client.get("/r/cut-360.jpg")

    assert response.status_code == 422
    assert "jpeg" in response.text
    assert again.status_code == 422
    assert variant_keys(s3, bucket) == []


def test_cut_jpeg_undecodable(settings):
    source = make_image(600, 400)

    with pytest.raises(UndecodableSource):
        imaging.make_variant(source[: len(source) * 6 // 10], 360, "jpg", settings)


def test_bytes_between_markers_accepted(settings):
    source = make_image(300, 200)
    # Stray bytes after the APP0 (JFIF) segment, before the next marker.
    after_app0 = 4 + int.from_bytes(source[4:6], "big")
    assert source[after_app0] == 0xFF
    padded = source[:after_app0] + b"\x00\x11\x22" + source[after_app0:]

    result = imaging.make_variant(padded, 360, "jpg", settings)

    assert (result.width, result.height) == (300, 200)


def test_garbage_after_eoi_accepted(settings):
    result = imaging.make_variant(make_image(300, 200) + b"trailing garbage" * 50, 360, "jpg", settings)

    assert (result.width, result.height) == (300, 200)


# Pixel bombs


def png_claiming(width: int, height: int) -> bytes:
    """A 64×64 PNG whose IHDR claims `width`×`height`, with the IHDR CRC recomputed."""
    png = bytearray(make_image(64, 64, ".png"))
    assert png[12:16] == b"IHDR"
    png[16:20] = width.to_bytes(4, "big")
    png[20:24] = height.to_bytes(4, "big")
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")
    return bytes(png)


def test_png_bomb_rejected_from_header(settings):
    bomb = png_claiming(100_000, 100_000)
    assert len(bomb) < 20_000

    with pytest.raises(SourceTooLarge) as error:
        imaging.make_variant(bomb, 360, "jpg", settings)

    assert "100000×100000" in error.value.message


async def test_png_bomb_413_and_not_stored(s3, bucket, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/bomb.png", Body=png_claiming(100_000, 100_000))

    async with running_app(s3_settings) as client:
        response = await client.get("/r/bomb-360.png")

    assert response.status_code == 413
    assert "PROXY_MAX_PIXELS" in response.text
    assert variant_keys(s3, bucket) == []


# Thin images: height = round(source height × width / source width), at least 1.


@pytest.mark.parametrize("output_format", OUTPUT_FORMATS)
@pytest.mark.parametrize(("size", "expected"), [((900, 1), (360, 1)), ((1, 900), (1, 900)), ((449, 3), (360, 2))])
def test_thin_image_no_zero_side(settings, output_format, size, expected):
    result = imaging.make_variant(make_image(*size, ".png"), 360, output_format, settings)

    image = decode(result.body)
    assert (result.width, result.height) == expected
    assert (image.width, image.height) == expected


# SVG: rasterised to the requested format, never served as SVG.

SVG_WITH_SCRIPT = b"""<svg xmlns="http://www.w3.org/2000/svg" width="200" height="100">
<rect id="box" width="200" height="100" fill="red"/>
<script>document.getElementById("box").setAttribute("fill", "blue")</script>
</svg>"""

SVG_WITH_FOREIGN_OBJECT = b"""<svg xmlns="http://www.w3.org/2000/svg" width="200" height="100">
<rect width="200" height="100" fill="red"/>
<foreignObject width="200" height="100">
<div xmlns="http://www.w3.org/1999/xhtml" style="width:200px;height:100px;background:blue">x</div>
</foreignObject>
</svg>"""


@pytest.mark.parametrize("output_format", OUTPUT_FORMATS)
@pytest.mark.parametrize("source", [SVG_WITH_SCRIPT, SVG_WITH_FOREIGN_OBJECT], ids=["script", "foreign_object"])
def test_svg_rasterised_red(settings, output_format, source):
    result = imaging.make_variant(source, 360, output_format, settings)

    image = decode(result.body)
    red, green, blue = band_means(image)[:3]
    assert result.content_type == imaging.CONTENT_TYPES[output_format]
    assert image.get("vips-loader") != "svgload_buffer"
    assert b"<svg" not in result.body
    assert red > 240
    assert blue < 15
    assert green < 15


async def test_svg_with_script_served_as_png(s3, bucket, s3_settings):
    s3.put_object(Bucket=bucket, Key="original/drawing.svg", Body=SVG_WITH_SCRIPT)

    async with running_app(s3_settings) as client:
        response = await client.get("/r/drawing-360.png")

    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert b"<script" not in response.content


# HEIC


def heic_from_avif(avif: bytes) -> bytes:
    """Turn a one-item AVIF written by libvips into an HEIC that libheif reads as HEVC.

    The av1C property becomes a 23-byte hvcC record with no parameter sets, the
    item type av01 becomes hvc1 and the brands avif become heic. The box sizes
    and the item locations are moved by the growth. The coded data stays AV1,
    which no HEVC decoder would read, but the tests need only the header.
    """
    hvcc = bytes([1, 0x01, 0x60, 0, 0, 0, 0x90, 0, 0, 0, 0, 0, 0x5A, 0xF0, 0x00, 0xFC, 0xFD, 0xF8, 0xF8, 0, 0, 0x0F, 0])
    data = bytearray(avif)

    av1c_start = data.index(b"av1C") - 4
    av1c_size = int.from_bytes(data[av1c_start : av1c_start + 4], "big")
    hvcc_box = (8 + len(hvcc)).to_bytes(4, "big") + b"hvcC" + hvcc
    growth = len(hvcc_box) - av1c_size
    data[av1c_start : av1c_start + av1c_size] = hvcc_box

    for parent in (b"ipco", b"iprp", b"meta"):
        start = data.index(parent) - 4
        size = int.from_bytes(data[start : start + 4], "big")
        data[start : start + 4] = (size + growth).to_bytes(4, "big")

    # iloc version 0 with 4-byte offsets, lengths and base offsets, as libheif
    # writes it: moving each item's base offset moves all its extents.
    iloc = data.index(b"iloc") + 4
    assert data[iloc] == 0
    assert data[iloc + 4 : iloc + 6] == b"\x44\x40"
    position = iloc + 8
    for _ in range(int.from_bytes(data[iloc + 6 : iloc + 8], "big")):
        position += 4
        base = int.from_bytes(data[position : position + 4], "big")
        data[position : position + 4] = (base + growth).to_bytes(4, "big")
        extent_count = int.from_bytes(data[position + 4 : position + 6], "big")
        position += 6 + 8 * extent_count

    return bytes(data).replace(b"av01", b"hvc1").replace(b"avif", b"heic")


@pytest.fixture(scope="module")
def heic() -> bytes:
    return heic_from_avif(make_image(64, 64, ".avif"))


def test_heic_fixture_reaches_hevc_decoder(heic):
    header = decode(heic)

    assert header.get("vips-loader") == "heifload_buffer"
    assert header.get("heif-compression") == "hevc"
    with pytest.raises(pyvips.Error, match="HEVC"):
        header.avg()


def test_heic_rejected_as_unsupported(settings, heic):
    with pytest.raises(UnsupportedFormat) as error:
        imaging.make_variant(heic, 360, "jpg", settings)

    assert "HEIC" in error.value.message


async def test_heic_415_and_not_stored(s3, bucket, s3_settings, heic):
    s3.put_object(Bucket=bucket, Key="original/phone.heic", Body=heic)

    async with running_app(s3_settings) as client:
        response = await client.get("/r/phone-360.jpg")

    assert response.status_code == 415
    assert "HEIC" in response.text
    assert variant_keys(s3, bucket) == []


def test_large_single_colour_png_processed(settings_for, tmp_path):
    # 36 megapixels, under the default PROXY_MAX_PIXELS of 100 million.
    source = pyvips.Image.black(6000, 6000).new_from_image([30, 120, 200]).copy(interpretation="srgb").pngsave_buffer()
    settings = settings_for(storage=str(tmp_path))

    result = imaging.make_variant(source, 720, "jpg", settings)

    assert (result.width, result.height) == (720, 720)


def test_large_png_over_pixel_limit_rejected(settings_for, tmp_path):
    source = pyvips.Image.black(6000, 6000).new_from_image([30, 120, 200]).copy(interpretation="srgb").pngsave_buffer()
    settings = settings_for(storage=str(tmp_path), max_pixels="30000000")

    with pytest.raises(SourceTooLarge) as error:
        imaging.make_variant(source, 720, "jpg", settings)

    assert "6000×6000" in error.value.message


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(b'<svg xmlns="http://www.w3.org/2000/svg" width="0" height="0"></svg>', id="zero-size"),
        pytest.param(b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"><rect wid', id="cut"),
        pytest.param(
            b'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><text>&x;</text></svg>',
            id="external-entity",
        ),
    ],
)
def test_broken_svg_undecodable(settings, source):
    with pytest.raises(UndecodableSource) as error:
        imaging.make_variant(source, 360, "png", settings)

    assert error.value.message.startswith("svg source could not be decoded")


def test_html_not_taken_for_svg(settings):
    with pytest.raises(UnsupportedFormat):
        imaging.make_variant(b"<html><body><svg></svg></body></html>", 360, "png", settings)
