"""Settings from `PROXY_*` environment variables, typed and checked at start-up.

Every setting is declared once here with its default. `load_settings` turns a
validation failure into a `SettingsError` whose message names the variable, the
bad value and what to set instead.
"""

import difflib
import logging
import os
import re
import unicodedata
from collections.abc import Mapping
from typing import Literal, Annotated, Any

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Output formats by URL extension. `jpeg` is an alias of `jpg`.
OUTPUT_FORMATS = ("jpg", "jpeg", "png", "webp", "avif")

# S3 bucket names: 3 to 63 lowercase letters, digits, dots and hyphens.
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# Four dot-separated numbers, like 192.168.5.4, which S3 rejects as a bucket name.
IP_ADDRESS_FORM = re.compile(r"^[0-9]+(\.[0-9]+){3}$")
# Beginnings that S3 reserves, from "General purpose bucket naming rules" in the
# Amazon S3 user guide. Names ending in `-s3alias` or `--ol-s3` are reserved for
# access point aliases, which S3 accepts in place of a bucket name, so they pass.
RESERVED_BUCKET_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")

# S3 rejects keys over 1024 bytes of UTF-8, and so does the URL path check. Half
# of that for a prefix leaves room for the folders and name that follow it.
MAX_PREFIX_BYTES = 512

ENV_PREFIX = "PROXY_"

logger = logging.getLogger(__name__)


# Characters of a valid event token: printable ASCII, no space.
TOKEN = re.compile(r"[\x21-\x7e]+")


class SettingsError(ValueError):
    """A setting has an invalid value. The message is meant for the operator."""


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    # Where sources and variants live: `s3://BUCKET` or a local folder.
    storage: str = "./images"
    widths: Annotated[list[int], NoDecode] = [360, 720, 1200, 2200]
    # Formats made for every width in upload-event mode. Any output format can be
    # requested over HTTP.
    formats: Annotated[list[str], NoDecode] = ["jpg", "webp"]
    source_prefix: str = "original/"
    variant_prefix: str = "r/"
    # Bearer token that `POST /events/s3` requires; unset or empty turns it off.
    event_token: SecretStr | None = None
    # Largest event document accepted, in bytes, and most records in one.
    event_max_bytes: int = Field(1024 * 1024, ge=1024)
    event_max_records: int = Field(100, ge=1)
    # Event documents handled at once per process; more get 503, which SNS and
    # EventBridge retry later.
    event_concurrency: int = Field(2, ge=1)
    # Serve the preview page at /preview/<source key>.
    preview: bool = True

    jpeg_quality: int = Field(90, ge=1, le=100)
    webp_quality: int = Field(80, ge=1, le=100)
    # libwebp method, 0 (fastest) to 6 (smallest files). At 2200 px, a 24-megapixel
    # photo encoded 2.6 times faster at effort 2 than at libwebp's default of 4.
    # Files of three photos grew by 2 to 4 %, and effort 3 was as slow as 4.
    webp_effort: int = Field(2, ge=0, le=6)
    avif_quality: int = Field(50, ge=1, le=100)
    # aom encoder effort, 0 (fastest) to 9 (smallest files). At 720 px wide, effort 2
    # encodes in tens of milliseconds; effort 4 takes ten times longer.
    avif_effort: int = Field(2, ge=0, le=9)
    # zlib level of PNG output, 0 (none) to 9 (smallest and slowest).
    png_compression: int = Field(6, ge=0, le=9)
    # RGB colour, as six hex digits, that alpha is flattened onto for JPEG output.
    background: str = "ffffff"

    # Sources over either limit get 413. The pixel count is read from the header.
    # 5 TiB, the largest S3 object, bounds the size so its byte count stays finite.
    max_source_mb: float = Field(50.0, gt=0, le=5 * 1024 * 1024, allow_inf_nan=False)
    max_pixels: int = Field(100_000_000, ge=1)
    # Sources with more frames (pages) get 413. Variants are stills of the first
    # frame; 1 rejects every animated source instead of making a still of it.
    max_frames: int = Field(1000, ge=1)
    # Seconds that libvips may work on one source's variants before it is stopped:
    # 504 for a request, a failed record in upload-event mode.
    processing_timeout: float = Field(20.0, ge=0.01, le=3600, allow_inf_nan=False)

    cache_control: str = "public, max-age=31536000, immutable"
    error_cache_control: str = "public, max-age=60"

    # Upper bound of the memory cache, counted in variant bytes. The limit of 1 PiB
    # is far above any memory size and keeps the byte count a finite integer.
    memory_cache_mb: float = Field(128, ge=0, le=1024**3, allow_inf_nan=False)
    # Seconds a variant stays in the memory cache; a replaced variant can be
    # served from another process's memory cache for this long.
    memory_cache_ttl: float = Field(300.0, gt=0, le=86400, allow_inf_nan=False)
    # Seconds that a resolved source key, or the absence of a source, is remembered.
    lookup_ttl: float = Field(60.0, ge=0, allow_inf_nan=False)
    # Threads that decode and encode images; 0 means one per CPU core.
    resize_threads: int = Field(0, ge=0, le=1024)
    # Variants being made at once per process, running or waiting for a thread;
    # a request past this gets 503 with Retry-After.
    resize_queue: int = Field(32, ge=1)

    # Seconds. A request that has waited an hour is stuck, so longer is rejected.
    s3_connect_timeout: float = Field(3.0, gt=0, le=3600, allow_inf_nan=False)
    s3_read_timeout: float = Field(10.0, gt=0, le=3600, allow_inf_nan=False)
    # Attempts per S3 request, the first one included.
    s3_max_attempts: int = Field(3, ge=1, le=10)

    log_level: str = "INFO"
    # `text` for plain lines, or `json` for one JSON object per line.
    log_format: Literal["text", "json"] = "text"

    @field_validator("event_token", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, value: Any) -> Any:
        # An empty token would let any request with an empty password in.
        if isinstance(value, str) and not value.strip():
            return None
        # A Bearer header cannot carry surrounding spaces, so they are dropped.
        token = value.strip() if isinstance(value, str) else value
        # HTTP headers carry bytes that are not ASCII inconsistently, and an
        # environment variable may hold bytes that are not UTF-8 at all.
        if isinstance(token, str) and not TOKEN.fullmatch(token):
            raise ValueError("the token must be printable ASCII without spaces; generate one with `openssl rand -hex 32`")
        return token

    @field_validator("widths", "formats", mode="before")
    @classmethod
    def _parse_list(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("widths")
    @classmethod
    def _check_widths(cls, widths: list[int]) -> list[int]:
        if not widths:
            raise ValueError("no widths given; list at least one, for example 360,720")
        for width in widths:
            if not 1 <= width <= 16383:
                raise ValueError(f"width {width} is out of range; use 1 to 16383 pixels")
        return sorted(set(widths))

    @field_validator("formats")
    @classmethod
    def _check_formats(cls, formats: list[str]) -> list[str]:
        if not formats:
            raise ValueError("no formats given; list at least one, for example jpg,webp")
        normalized = []
        for name in formats:
            name = name.lower()
            if name not in OUTPUT_FORMATS:
                raise ValueError(f"unknown format {name!r}; use {', '.join(OUTPUT_FORMATS)}")
            name = "jpg" if name == "jpeg" else name
            if name not in normalized:
                normalized.append(name)
        return normalized

    @field_validator("cache_control", "error_cache_control")
    @classmethod
    def _check_cache_control(cls, value: str) -> str:
        # h11 (0.16 here), one of uvicorn's two HTTP/1.1 implementations, rejects a
        # header value with leading or trailing spaces, so they are stripped.
        value = value.strip(" ")
        if not value:
            raise ValueError("empty; set a Cache-Control header value, for example public, max-age=60")
        for position, char in enumerate(value):
            if not " " <= char <= "~":
                raise ValueError(
                    f"character {char!r} at position {position} is not printable ASCII, so it cannot "
                    "go in an HTTP header; use only ASCII letters, digits, spaces and punctuation"
                )
        return value

    @field_validator("storage")
    @classmethod
    def _check_storage(cls, storage: str) -> str:
        if storage.startswith("s3://"):
            bucket = storage.removeprefix("s3://").rstrip("/")
            _check_bucket_name(bucket)
            return f"s3://{bucket}"
        if not storage:
            raise ValueError("empty; set s3://BUCKET or a local folder")
        if not os.path.isdir(storage):
            raise ValueError(
                "folder not found; create it or set s3://BUCKET for an S3 bucket"
            )
        return storage

    @field_validator("source_prefix", "variant_prefix")
    @classmethod
    def _check_prefix(cls, prefix: str) -> str:
        if prefix.startswith("/"):
            raise ValueError("a key prefix must not start with '/'; for example r/")
        if prefix and not prefix.endswith("/"):
            raise ValueError(f"a key prefix must end with '/'; for example {prefix}/")
        if "//" in prefix or any(part in (".", "..") for part in prefix.split("/")):
            raise ValueError("a key prefix must not contain '//', '.' or '..' segments")
        # The URL path check in proxy/paths.py rejects these in every request.
        if "\\" in prefix:
            raise ValueError("a key prefix must not contain a backslash; use '/' between folders")
        for char in prefix:
            category = unicodedata.category(char)
            if category == "Cc":
                raise ValueError(f"a key prefix must not contain the control character {char!r}")
            if category == "Cs":
                # os.environ turns bytes that are not UTF-8 into lone surrogates.
                raise ValueError("a key prefix must be valid UTF-8")
        size = len(prefix.encode("utf-8"))
        if size > MAX_PREFIX_BYTES:
            raise ValueError(
                f"a key prefix must be at most {MAX_PREFIX_BYTES} bytes of UTF-8, so that the keys "
                f"under it fit the S3 limit of 1024 bytes; this one is {size} bytes"
            )
        return prefix

    @field_validator("variant_prefix")
    @classmethod
    def _check_variant_prefix(cls, prefix: str) -> str:
        if not prefix:
            raise ValueError("must not be empty, because variants need their own prefix; for example r/")
        return prefix

    @field_validator("background")
    @classmethod
    def _check_background(cls, background: str) -> str:
        background = background.removeprefix("#").lower()
        if not re.fullmatch(r"[0-9a-f]{6}", background):
            raise ValueError("expected six hex digits of an RGB colour, for example ffffff")
        return background

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, level: str) -> str:
        level = level.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("use DEBUG, INFO, WARNING or ERROR")
        return level

    @model_validator(mode="after")
    def _check_prefixes_apart(self) -> "Settings":
        # A source prefix inside the variant prefix would make variants of variants.
        if self.source_prefix.startswith(self.variant_prefix):
            raise ValueError(
                f"PROXY_SOURCE_PREFIX={self.source_prefix!r} lies inside "
                f"PROXY_VARIANT_PREFIX={self.variant_prefix!r}; choose prefixes apart, "
                "for example original/ and r/"
            )
        return self

    @property
    def bucket(self) -> str | None:
        if self.storage.startswith("s3://"):
            return self.storage.removeprefix("s3://")
        return None

    @property
    def background_rgb(self) -> list[int]:
        return [int(self.background[i : i + 2], 16) for i in (0, 2, 4)]

    @property
    def variant_url_prefix(self) -> str:
        """The URL path prefix of variants, for example `/r/`."""
        return "/" + self.variant_prefix

    @property
    def thread_count(self) -> int:
        return self.resize_threads or os.cpu_count() or 1


def _check_bucket_name(bucket: str) -> None:
    """Raise ValueError naming the S3 bucket naming rule that `bucket` breaks."""
    if not BUCKET_NAME.match(bucket):
        reason = (
            "it must be 3 to 63 lowercase letters, digits, dots and hyphens, "
            "starting and ending with a letter or digit"
        )
    elif ".." in bucket:
        reason = "it must not contain two adjacent dots"
    elif IP_ADDRESS_FORM.match(bucket):
        reason = "it must not be formatted like an IP address"
    elif bucket.startswith(RESERVED_BUCKET_PREFIXES):
        reason = f"S3 reserves names starting with {', '.join(RESERVED_BUCKET_PREFIXES)}"
    else:
        return
    raise ValueError(f"{bucket!r} is not a valid S3 bucket name, because {reason}; set s3://BUCKET with a valid name")


def find_unknown_variables(environ: Mapping[str, str]) -> dict[str, str | None]:
    """Map each `PROXY_*` variable that names no setting to the setting it most resembles.

    The value is None where no setting name is close. Names are compared without
    regard to case, as pydantic-settings reads them, and without the shared
    `PROXY_` prefix, which would make every name look close.
    """
    known = [name.upper() for name in Settings.model_fields]
    unknown: dict[str, str | None] = {}
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper.removeprefix(ENV_PREFIX) in known:
            continue
        matches = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), known, n=1)
        unknown[name] = ENV_PREFIX + matches[0] if matches else None
    return unknown


# Unknown variables already warned about, so that each is logged once per process
# although the CLI and then the app factory both load the settings.
_warned_variables: set[str] = set()


def _warn_unknown_variables() -> None:
    for name, match in find_unknown_variables(os.environ).items():
        if name in _warned_variables:
            continue
        _warned_variables.add(name)
        if match:
            logger.warning("unknown variable %s is ignored. Did you mean %s?", name, match)
        else:
            logger.warning(
                "unknown variable %s is ignored, because no setting has that name. The README lists the settings",
                name,
            )


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment, with `overrides` taking precedence.

    Logs a warning for each `PROXY_*` variable that names no setting, with the
    setting it probably means. Raises SettingsError naming each invalid
    variable and its value.
    """
    _warn_unknown_variables()
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise SettingsError(_describe(error)) from None


def _describe(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        message = problem["msg"].removeprefix("Value error, ")
        if problem["loc"]:
            name = str(problem["loc"][0])
            variable = ENV_PREFIX + name.upper()
            value = "(hidden)" if name in SECRET_SETTINGS else _show(problem.get("input"))
            lines.append(f"invalid {variable}={value}: {message}")
        else:
            lines.append(f"invalid settings: {message}")
    return "\n".join(lines)


# Secrets are never shown in an error message.
SECRET_SETTINGS = {"event_token"}


def _show(value: Any) -> str:
    if isinstance(value, list):
        value = ",".join(str(item) for item in value)
    return repr(str(value))
