"""Settings from `PROXY_*` environment variables, typed and checked at start-up.

Every setting is declared once here with its default. `load_settings` turns a
validation failure into a `SettingsError` whose message names the variable, the
bad value and what to set instead.
"""

import os
import re
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Output formats by URL extension. `jpeg` is an alias of `jpg`.
OUTPUT_FORMATS = ("jpg", "jpeg", "png", "webp", "avif")

# S3 bucket names: 3 to 63 lowercase letters, digits, dots and hyphens.
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

ENV_PREFIX = "PROXY_"


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

    jpeg_quality: int = Field(90, ge=1, le=100)
    webp_quality: int = Field(80, ge=1, le=100)
    avif_quality: int = Field(50, ge=1, le=100)
    # aom encoder effort, 0 (fastest) to 9 (smallest files). At 720 px wide, effort 2
    # encodes in tens of milliseconds; effort 4 takes ten times longer.
    avif_effort: int = Field(2, ge=0, le=9)
    # zlib level of PNG output, 0 (none) to 9 (smallest and slowest).
    png_compression: int = Field(6, ge=0, le=9)
    # RGB colour, as six hex digits, that alpha is flattened onto for JPEG output.
    background: str = "ffffff"

    # Sources over either limit get 413. The pixel count is read from the header.
    max_source_mb: float = Field(50.0, gt=0)
    max_pixels: int = Field(100_000_000, ge=1)

    cache_control: str = "public, max-age=31536000, immutable"
    error_cache_control: str = "public, max-age=60"

    # Upper bound of the memory cache, counted in variant bytes.
    memory_cache_mb: float = Field(128, ge=0)
    # Seconds that a resolved source key, or the absence of a source, is remembered.
    lookup_ttl: float = Field(60.0, ge=0)
    # Threads that decode and encode images; 0 means one per CPU core.
    resize_threads: int = Field(0, ge=0)

    s3_connect_timeout: float = Field(3.0, gt=0)
    s3_read_timeout: float = Field(10.0, gt=0)
    # Attempts per S3 request, the first one included.
    s3_max_attempts: int = Field(3, ge=1, le=10)

    log_level: str = "INFO"

    @field_validator("event_token", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, value: Any) -> Any:
        # An empty token would let any request with an empty password in.
        if isinstance(value, str) and not value.strip():
            return None
        return value

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

    @field_validator("storage")
    @classmethod
    def _check_storage(cls, storage: str) -> str:
        if storage.startswith("s3://"):
            bucket = storage.removeprefix("s3://").rstrip("/")
            if not BUCKET_NAME.match(bucket):
                raise ValueError(
                    f"{bucket!r} is not a valid S3 bucket name; use s3://BUCKET with "
                    "3 to 63 lowercase letters, digits, dots and hyphens"
                )
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
    def thread_count(self) -> int:
        return self.resize_threads or os.cpu_count() or 1


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment, with `overrides` taking precedence.

    Raises SettingsError naming each invalid variable and its value.
    """
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise SettingsError(_describe(error)) from None


def _describe(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        message = problem["msg"].removeprefix("Value error, ")
        if problem["loc"]:
            variable = ENV_PREFIX + str(problem["loc"][0]).upper()
            value = problem.get("input")
            lines.append(f"invalid {variable}={_show(value)}: {message}")
        else:
            lines.append(f"invalid settings: {message}")
    return "\n".join(lines)


def _show(value: Any) -> str:
    if isinstance(value, list):
        value = ",".join(str(item) for item in value)
    return repr(str(value))
