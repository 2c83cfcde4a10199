"""load_settings: PROXY_* environment variables, their defaults and their error messages."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

from proxy import settings as settings_module
from proxy.errors import InvalidPath
from proxy.paths import parse_variant_path
from proxy.settings import SettingsError, find_unknown_variables, load_settings


@pytest.fixture
def folder(tmp_path: Path) -> str:
    """An existing local store folder, so PROXY_STORAGE is valid unless a test changes it."""
    return str(tmp_path)


def settings_error(settings_for, **variables: str) -> str:
    """Load settings that must fail, and return the SettingsError message."""
    with pytest.raises(SettingsError) as raised:
        settings_for(**variables)
    return str(raised.value)


# Defaults


def test_defaults_widths(settings_for, folder: str):
    assert settings_for(storage=folder).widths == [360, 720, 1200, 2200]


def test_defaults_formats(settings_for, folder: str):
    assert settings_for(storage=folder).formats == ["jpg", "webp"]


def test_defaults_prefixes(settings_for, folder: str):
    settings = settings_for(storage=folder)

    assert settings.source_prefix == "original/"
    assert settings.variant_prefix == "r/"


def test_defaults_encoder_settings(settings_for, folder: str):
    settings = settings_for(storage=folder)

    assert settings.jpeg_quality == 90
    assert settings.background == "ffffff"
    assert settings.background_rgb == [255, 255, 255]


def test_defaults_cache_control(settings_for, folder: str):
    settings = settings_for(storage=folder)

    assert settings.cache_control == "public, max-age=31536000, immutable"


def test_defaults_no_event_token(settings_for, folder: str):
    assert settings_for(storage=folder).event_token is None


def test_default_storage_is_images_folder(settings_for, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "images").mkdir()
    monkeypatch.chdir(tmp_path)

    settings = settings_for()

    assert settings.storage == "./images"
    assert settings.bucket is None


def test_s3_storage_names_bucket(settings_for):
    settings = settings_for(storage="s3://photos.example-1/")

    assert settings.storage == "s3://photos.example-1"
    assert settings.bucket == "photos.example-1"


# Comma lists


def test_widths_parse_with_spaces(settings_for, folder: str):
    settings = settings_for(storage=folder, widths=" 720 , 360,1200 ")

    assert settings.widths == [360, 720, 1200]


def test_widths_sorted_without_duplicates(settings_for, folder: str):
    settings = settings_for(storage=folder, widths="720,360,720")

    assert settings.widths == [360, 720]


def test_formats_parse_with_spaces(settings_for, folder: str):
    settings = settings_for(storage=folder, formats=" webp , avif ")

    assert settings.formats == ["webp", "avif"]


def test_formats_jpeg_becomes_jpg(settings_for, folder: str):
    settings = settings_for(storage=folder, formats="JPEG, jpg, PNG")

    assert settings.formats == ["jpg", "png"]


# Invalid values: each message names the variable and shows the value.


@pytest.mark.parametrize(
    ("variables", "variable", "shown_value"),
    [
        ({"widths": "abc"}, "PROXY_WIDTHS", "'abc'"),
        ({"widths": "360,abc"}, "PROXY_WIDTHS", "'abc'"),
        ({"widths": "0"}, "PROXY_WIDTHS", "'0'"),
        ({"widths": "360,0"}, "PROXY_WIDTHS", "'360,0'"),
        ({"widths": "-360"}, "PROXY_WIDTHS", "'-360'"),
        ({"widths": "16384"}, "PROXY_WIDTHS", "'16384'"),
        ({"widths": ""}, "PROXY_WIDTHS", "''"),
        ({"widths": " , "}, "PROXY_WIDTHS", "' , '"),
        ({"formats": "bmp"}, "PROXY_FORMATS", "bmp"),
        ({"formats": "jpg,gif"}, "PROXY_FORMATS", "gif"),
        ({"formats": ""}, "PROXY_FORMATS", "''"),
        ({"jpeg_quality": "0"}, "PROXY_JPEG_QUALITY", "'0'"),
        ({"jpeg_quality": "101"}, "PROXY_JPEG_QUALITY", "'101'"),
        ({"webp_quality": "high"}, "PROXY_WEBP_QUALITY", "'high'"),
        ({"storage": "s3://A_B"}, "PROXY_STORAGE", "A_B"),
        ({"storage": "s3://ab"}, "PROXY_STORAGE", "'ab'"),
        ({"storage": ""}, "PROXY_STORAGE", "''"),
        ({"variant_prefix": ""}, "PROXY_VARIANT_PREFIX", "''"),
        ({"variant_prefix": "r"}, "PROXY_VARIANT_PREFIX", "'r'"),
        ({"variant_prefix": "/r/"}, "PROXY_VARIANT_PREFIX", "'/r/'"),
        ({"variant_prefix": "r/../"}, "PROXY_VARIANT_PREFIX", "'r/../'"),
        ({"variant_prefix": "r//"}, "PROXY_VARIANT_PREFIX", "'r//'"),
        ({"source_prefix": "original"}, "PROXY_SOURCE_PREFIX", "'original'"),
        ({"source_prefix": "r/"}, "PROXY_SOURCE_PREFIX", "'r/'"),
        ({"source_prefix": "r/orig/"}, "PROXY_SOURCE_PREFIX", "'r/orig/'"),
        ({"source_prefix": "img/src/", "variant_prefix": "img/"}, "PROXY_SOURCE_PREFIX", "'img/src/'"),
        ({"background": "zzzzzz"}, "PROXY_BACKGROUND", "'zzzzzz'"),
        ({"background": "#fff"}, "PROXY_BACKGROUND", "'#fff'"),
        ({"background": "ffffff00"}, "PROXY_BACKGROUND", "'ffffff00'"),
        ({"log_level": "verbose"}, "PROXY_LOG_LEVEL", "'verbose'"),
        ({"lookup_ttl": "-1"}, "PROXY_LOOKUP_TTL", "'-1'"),
        ({"s3_max_attempts": "0"}, "PROXY_S3_MAX_ATTEMPTS", "'0'"),
        ({"max_source_mb": "0"}, "PROXY_MAX_SOURCE_MB", "'0'"),
        ({"max_source_mb": "1e308"}, "PROXY_MAX_SOURCE_MB", "'1e308'"),
        ({"memory_cache_mb": "1e308"}, "PROXY_MEMORY_CACHE_MB", "'1e308'"),
        ({"s3_connect_timeout": "3601"}, "PROXY_S3_CONNECT_TIMEOUT", "'3601'"),
        ({"s3_read_timeout": "1e9"}, "PROXY_S3_READ_TIMEOUT", "'1e9'"),
        ({"processing_timeout": "0"}, "PROXY_PROCESSING_TIMEOUT", "'0'"),
        ({"processing_timeout": "3601"}, "PROXY_PROCESSING_TIMEOUT", "'3601'"),
        ({"processing_timeout": "soon"}, "PROXY_PROCESSING_TIMEOUT", "'soon'"),
        ({"processing_timeout": "1e-9"}, "PROXY_PROCESSING_TIMEOUT", "'1e-9'"),
        ({"resize_threads": "100000"}, "PROXY_RESIZE_THREADS", "'100000'"),
        ({"max_frames": "0"}, "PROXY_MAX_FRAMES", "'0'"),
        ({"max_frames": "1.5"}, "PROXY_MAX_FRAMES", "'1.5'"),
    ],
)
def test_invalid_value_message_names_it(settings_for, folder: str, variables: dict, variable: str, shown_value: str):
    message = settings_error(settings_for, **{"storage": folder, **variables})

    assert variable in message
    assert shown_value in message


FLOAT_SETTINGS = [
    "memory_cache_mb",
    "lookup_ttl",
    "max_source_mb",
    "s3_connect_timeout",
    "s3_read_timeout",
    "processing_timeout",
]


@pytest.mark.parametrize("name", FLOAT_SETTINGS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity", "1e400"])
def test_float_rejects_non_finite(settings_for, folder: str, name: str, value: str):
    message = settings_error(settings_for, **{"storage": folder, name: value})

    assert f"PROXY_{name.upper()}={value!r}" in message
    assert "finite number" in message


def test_timeouts_accept_one_hour(settings_for, folder: str):
    settings = settings_for(storage=folder, s3_connect_timeout="3600", s3_read_timeout="0.5")

    assert settings.s3_connect_timeout == 3600
    assert settings.s3_read_timeout == 0.5


@pytest.mark.parametrize("name", ["cache_control", "error_cache_control"])
@pytest.mark.parametrize(
    "value",
    [
        "public, max-age=60 \u20ac",
        "public\r\nSet-Cookie: a=b",
        "public, max-age=60\n",
        "public,\tmax-age=60",
        "public\x1b",
        "public\x7f",
        "",
        "   ",
    ],
)
def test_cache_control_rejects_unsafe_value(settings_for, folder: str, name: str, value: str):
    message = settings_error(settings_for, **{"storage": folder, name: value})

    assert f"PROXY_{name.upper()}={value!r}" in message
    assert "\n" not in message
    assert "\r" not in message


def test_cache_control_message_names_character(settings_for, folder: str):
    message = settings_error(settings_for, storage=folder, cache_control="public, max-age=60 \u20ac")

    assert "'\u20ac' at position 19" in message
    assert "printable ASCII" in message


def test_cache_control_spaces_trimmed(settings_for, folder: str):
    settings = settings_for(storage=folder, cache_control=" no-store ", error_cache_control="no-cache ")

    assert settings.cache_control == "no-store"
    assert settings.error_cache_control == "no-cache"


# Key prefixes that every request URL would fail on, so they fail at start-up.
UNREACHABLE_PREFIXES = [
    "a\\b/",
    "r\\/",
    "r\x07/",
    "r\t/",
    "r\x7f/",
    "r\x85/",
    "r\udcff/",
    "a" * 1100 + "/",
]


@pytest.mark.parametrize("name", ["source_prefix", "variant_prefix"])
@pytest.mark.parametrize("prefix", [*UNREACHABLE_PREFIXES, "a" * 512 + "/"])
def test_prefix_rejects_unreachable_key(settings_for, folder: str, name: str, prefix: str):
    message = settings_error(settings_for, **{"storage": folder, name: prefix})

    assert f"PROXY_{name.upper()}=" in message
    assert repr(prefix) in message
    assert "a key prefix must" in message


@pytest.mark.parametrize("prefix", UNREACHABLE_PREFIXES)
def test_rejected_prefix_fails_path_check(settings_for, folder: str, prefix: str):
    # The URL path check agrees: a variant URL under this prefix would be 400.
    settings = settings_for(storage=folder)
    raw_path = "/" + prefix + "photo-720.jpg"

    with pytest.raises(InvalidPath):
        parse_variant_path(raw_path.encode("utf-8", "surrogateescape"), settings)


@pytest.mark.parametrize("prefix", ["r/", "r 1/", "caf\u00e9/2024/", "a%b/", "a" * 511 + "/"])
def test_accepted_prefix_passes_path_check(settings_for, folder: str, prefix: str):
    settings = settings_for(storage=folder, variant_prefix=prefix)
    raw_path = "/" + prefix + "photo-720.jpg"

    request = parse_variant_path(raw_path.encode("utf-8"), settings)

    assert request.key == prefix + "photo-720.jpg"
    assert request.width == 720


@pytest.mark.parametrize(
    ("bucket", "rule"),
    [
        ("my..bucket", "two adjacent dots"),
        ("192.168.5.4", "IP address"),
        ("10.0.0.300", "IP address"),
        ("xn--photos", "xn--"),
        ("sthree-photos", "sthree-"),
        ("amzn-s3-demo-photos", "amzn-s3-demo-"),
        ("Photos", "lowercase"),
        ("-photos", "starting and ending"),
        ("a" * 64, "3 to 63"),
    ],
)
def test_bucket_name_rule_violations(settings_for, bucket: str, rule: str):
    message = settings_error(settings_for, storage=f"s3://{bucket}")

    assert f"PROXY_STORAGE='s3://{bucket}'" in message
    assert "not a valid S3 bucket name" in message
    assert rule in message


@pytest.mark.parametrize("bucket", ["my.bucket.1", "192.168.5", "photos-xn--1", "photos-s3alias", "photos--ol-s3", "a" * 63])
def test_bucket_name_unusual_but_valid(settings_for, bucket: str):
    assert settings_for(storage=f"s3://{bucket}").bucket == bucket


def test_missing_folder_message_names_it(settings_for, tmp_path: Path):
    missing = str(tmp_path / "no-such-folder")

    message = settings_error(settings_for, storage=missing)

    assert "PROXY_STORAGE" in message
    assert missing in message
    assert "not found" in message


def test_prefix_conflict_message_names_both(settings_for, folder: str):
    message = settings_error(settings_for, storage=folder, source_prefix="r/orig/")

    assert "PROXY_SOURCE_PREFIX='r/orig/'" in message
    assert "PROXY_VARIANT_PREFIX='r/'" in message


def test_each_invalid_variable_is_listed(settings_for, folder: str):
    message = settings_error(settings_for, storage=folder, widths="abc", formats="bmp", jpeg_quality="0")

    assert "PROXY_WIDTHS='abc'" in message
    assert "PROXY_FORMATS='bmp'" in message
    assert "PROXY_JPEG_QUALITY='0'" in message
    assert len(message.splitlines()) == 3


def test_width_message_names_bad_item(settings_for, folder: str):
    message = settings_error(settings_for, storage=folder, widths="360,0,720")

    assert "width 0 is out of range" in message


def test_settings_error_hides_validation_error(settings_for, folder: str):
    # The message alone is for the operator, so the pydantic error is not chained.
    with pytest.raises(SettingsError) as raised:
        settings_for(storage=folder, widths="abc")

    assert raised.value.__cause__ is None
    assert raised.value.__suppress_context__


def test_overrides_take_precedence(settings_for, folder: str, monkeypatch: pytest.MonkeyPatch):
    settings_for(storage=folder)
    monkeypatch.setenv("PROXY_WIDTHS", "abc")

    settings = load_settings(widths=[100])

    assert settings.widths == [100]


# Valid but unusual values


def test_empty_source_prefix_accepted(settings_for, folder: str):
    settings = settings_for(storage=folder, source_prefix="", variant_prefix="r/")

    assert settings.source_prefix == ""
    assert settings.variant_prefix == "r/"


def test_sibling_prefixes_accepted(settings_for, folder: str):
    # `r2/` starts with the letter r but is not inside `r/`.
    settings = settings_for(storage=folder, source_prefix="r2/", variant_prefix="r/")

    assert settings.source_prefix == "r2/"


def test_background_hash_and_case_normalized(settings_for, folder: str):
    settings = settings_for(storage=folder, background="#FF8000")

    assert settings.background == "ff8000"
    assert settings.background_rgb == [255, 128, 0]


# Unknown PROXY_* variables


def test_unknown_variable_suggests_setting():
    unknown = find_unknown_variables({"PROXY_WIDHTS": "720", "PROXY_S3_CONECT_TIMEOUT": "5"})

    assert unknown["PROXY_WIDHTS"] == "PROXY_WIDTHS"
    assert unknown["PROXY_S3_CONECT_TIMEOUT"] == "PROXY_S3_CONNECT_TIMEOUT"


def test_unknown_variable_without_close_match():
    # Compared with the prefix, PROXY_FOO would look close to PROXY_FORMATS.
    assert find_unknown_variables({"PROXY_FOO": "1"}) == {"PROXY_FOO": None}


def test_unknown_variable_skips_known_and_other():
    environ = {"PROXY_WIDTHS": "720", "proxy_formats": "jpg", "HOME": "/root", "RESIZE_PROXY_VENV": "/tmp/venv"}

    assert find_unknown_variables(environ) == {}


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget the unknown variables that this process has warned about already."""
    monkeypatch.setattr(settings_module, "_warned_variables", set())


def test_unknown_variable_logged_at_load(settings_for, folder: str, fresh_warnings, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="proxy.settings"):
        settings = settings_for(storage=folder, widhts="720")

    assert settings.widths == [360, 720, 1200, 2200]
    assert len(caplog.records) == 1
    assert caplog.records[0].levelno == logging.WARNING
    assert "PROXY_WIDHTS" in caplog.messages[0]
    assert "Did you mean PROXY_WIDTHS?" in caplog.messages[0]


def test_unknown_variable_logged_once(settings_for, folder: str, fresh_warnings, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="proxy.settings"):
        settings_for(storage=folder, widhts="720")
        load_settings()

    assert len(caplog.records) == 1


def test_unknown_variable_logged_before_error(
    settings_for, folder: str, fresh_warnings, caplog: pytest.LogCaptureFixture
):
    # A misspelled name is often why another setting is invalid or missing.
    with caplog.at_level(logging.WARNING, logger="proxy.settings"):
        message = settings_error(settings_for, storage=folder, widths="abc", formts="png")

    assert "PROXY_WIDTHS='abc'" in message
    assert "Did you mean PROXY_FORMATS?" in caplog.text


# Secrets


def test_event_token_not_in_repr(settings_for, folder: str):
    settings = settings_for(storage=folder, event_token="s3cret-token-value")

    assert "s3cret-token-value" not in repr(settings)
    assert "s3cret-token-value" not in str(settings)
    assert settings.event_token.get_secret_value() == "s3cret-token-value"


# The command


def test_serve_invalid_widths_exits_cleanly(tmp_path: Path):
    env = {name: value for name, value in os.environ.items() if not name.startswith("PROXY_")}
    env["PROXY_STORAGE"] = str(tmp_path)
    env["PROXY_WIDTHS"] = "abc"

    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1", "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode != 0
    assert "PROXY_WIDTHS" in result.stderr
    assert "abc" in result.stderr
    assert "Traceback" not in result.stderr
    assert "serving" not in result.stderr


@pytest.mark.parametrize("token", ["tökén-secret", "secret\udcff\udcfe", "two words", "tab\tinside"])
def test_event_token_not_ascii_rejected_unshown(settings_for, folder: str, token: str):
    message = settings_error(settings_for, storage=folder, event_token=token)

    assert "PROXY_EVENT_TOKEN=(hidden)" in message
    assert "printable ASCII" in message
    assert "secret" not in message
    assert "words" not in message


def test_event_token_printable_ascii_accepted(settings_for, folder: str):
    settings = settings_for(storage=folder, event_token="  a-Z_0.9~!$%&'()*+,;=:@/?  ")

    assert settings.event_token is not None
    assert settings.event_token.get_secret_value() == "a-Z_0.9~!$%&'()*+,;=:@/?"
