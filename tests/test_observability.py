"""Health, readiness, Prometheus metrics and log formats."""

import io
import json
import logging
import os
import re
import shlex
import sys
import time

from conftest import make_image, running_app
from prometheus_client.parser import text_string_to_metric_families

from proxy import access_log
from proxy import app as app_module
from proxy.cli import log_config
from proxy.logs import JsonFormatter, TextFormatter


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Map (sample name, sorted labels) to value, from a Prometheus text page."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def value(page: dict, name: str, **labels: str) -> float:
    return page.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_requests_layers_and_generations(s3, bucket, settings_for):
    settings = settings_for(storage=f"s3://{bucket}")
    s3.put_object(Bucket=bucket, Key="original/m.jpg", Body=make_image(800, 600))

    async with running_app(settings) as client:
        before = samples((await client.get("/metrics")).text)
        await client.get("/r/m-360.jpg")
        await client.get("/r/m-360.jpg")
        await client.get("/r/missing-360.jpg")
        after_response = await client.get("/metrics")
        after = samples(after_response.text)

    assert after_response.headers["content-type"].startswith("text/plain")

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("resize_proxy_requests_total", route="variant", status="200") == 2
    assert grew("resize_proxy_requests_total", route="variant", status="404") == 1
    assert grew("resize_proxy_variants_served_total", layer="generated") == 1
    assert grew("resize_proxy_variants_served_total", layer="memory") == 1
    assert grew("resize_proxy_generation_seconds_count") == 1
    assert grew("resize_proxy_source_bytes_total") > 0
    assert grew("resize_proxy_response_bytes_total") > 0
    assert value(after, "resize_proxy_generations_in_progress") == 0


async def test_metrics_route_labels_bounded(s3, bucket, settings_for):
    # Arbitrary paths must not create a metric series each.
    settings = settings_for(storage=f"s3://{bucket}")

    async with running_app(settings) as client:
        for number in range(5):
            await client.get(f"/unknown-{number}")
        page = (await client.get("/metrics")).text

    assert "unknown-" not in page
    assert value(samples(page), "resize_proxy_requests_total", route="other", status="404") >= 5


async def test_readyz_reports_store_and_formats(bucket, settings_for):
    settings = settings_for(storage=f"s3://{bucket}")

    async with running_app(settings) as client:
        response = await client.get("/readyz")

    assert response.status_code == 200
    assert "formats loaded" in response.text


async def test_start_up_reports_readable_formats(bucket, settings_for, caplog):
    settings = settings_for(storage=f"s3://{bucket}")
    caplog.set_level(logging.INFO, logger="proxy.app")

    async with running_app(settings):
        pass

    started = [record.getMessage() for record in caplog.records if "resize-proxy started" in record.getMessage()]
    assert len(started) == 1
    assert "sources=jpeg,png,webp,gif,tiff,avif,svg" in started[0]


async def test_missing_libvips_operation_warned_and_not_ready(bucket, settings_for, caplog, monkeypatch):
    # A loader that no libvips build has plays the part of one missing from this build.
    monkeypatch.setattr(app_module, "REQUIRED_OPERATIONS", (*app_module.REQUIRED_OPERATIONS, "jxlload_nothere"))
    settings = settings_for(storage=f"s3://{bucket}")

    async with running_app(settings) as client:
        response = await client.get("/readyz")

    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert response.status_code == 503
    assert "jxlload_nothere" in response.text
    assert any("libvips lacks jxlload_nothere" in message for message in warnings)


async def test_readyz_fails_for_missing_bucket(aws_env, settings_for):
    settings = settings_for(storage="s3://no-such-bucket-for-readyz")

    async with running_app(settings) as client:
        response = await client.get("/readyz")

    assert response.status_code == 502
    assert response.headers["cache-control"] == "no-store"


def test_json_log_lines_parse():
    config = log_config("INFO", "json")
    formatter_class = config["formatters"]["json"]["()"]
    module_name, _, class_name = formatter_class.rpartition(".")
    formatter = getattr(__import__(module_name, fromlist=[class_name]), class_name)()
    record = logging.LogRecord("proxy.access_log", logging.INFO, __file__, 1, "request id=%s\nforged", ("abc",), None)

    line = formatter.format(record)
    entry = json.loads(line)

    assert "\n" not in line
    assert entry["level"] == "INFO"
    assert entry["logger"] == "proxy.access_log"
    assert entry["message"] == "request id=abc\nforged"


async def test_metrics_count_events_by_result(s3, bucket, settings_for):
    settings = settings_for(storage=f"s3://{bucket}", event_token="t0ken")
    s3.put_object(Bucket=bucket, Key="original/e.jpg", Body=make_image(500, 300))
    document = {
        "Records": [
            {"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
             "s3": {"bucket": {"name": bucket}, "object": {"key": key}}}
            for key in ("original/e.jpg", "r/e-360.jpg")
        ]
    }

    async with running_app(settings) as client:
        before = samples((await client.get("/metrics")).text)
        await client.post("/events/s3", json=document, headers={"Authorization": "Bearer t0ken"})
        after = samples((await client.get("/metrics")).text)

    assert value(after, "resize_proxy_events_total", result="made") - value(before, "resize_proxy_events_total", result="made") == 1
    assert value(after, "resize_proxy_events_total", result="skipped") - value(before, "resize_proxy_events_total", result="skipped") == 1


def test_text_formatter_matches_standard():
    standard = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    fast = TextFormatter()

    def record(created: float, exc_info=None) -> logging.LogRecord:
        log_record = logging.LogRecord("proxy.x", logging.WARNING, __file__, 1, "value=%s", ("a b",), exc_info)
        log_record.created = created
        log_record.msecs = int((created - int(created)) * 1000) + 0.0
        return log_record

    # The second changes between lines, then stays for two lines with other milliseconds.
    for created in (1764900000.0, 1764900001.25, 1764900001.999, 1764899999.5):
        assert fast.format(record(created)) == standard.format(record(created))
    try:
        raise ValueError("broken")
    except ValueError:
        error = sys.exc_info()
    assert fast.format(record(1764900002.5, error)) == standard.format(record(1764900002.5, error))
    assert fast.format(record(1764900002.5, error)).endswith("ValueError: broken")


def test_request_ids_unique_across_fork():
    ids = {access_log._request_id({"headers": []}) for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32}", request_id) for request_id in ids)

    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.write(write_end, access_log._request_id({"headers": []}).encode())
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    child_id = os.read(read_end, 64).decode()
    os.close(read_end)
    os.close(write_end)
    parent_id = access_log._request_id({"headers": []})
    # The counter part may match; the per-process part must not.
    assert re.fullmatch(r"[0-9a-f]{32}", child_id)
    assert child_id[:24] != parent_id[:24]


async def test_head_counts_no_response_bytes(s3, bucket, settings_for):
    settings = settings_for(storage=f"s3://{bucket}")

    async with running_app(settings) as client:
        first_page = await client.get("/metrics")
        for path in ("/healthz", "/readyz", "/r/missing-360.jpg", "/r/bad"):
            await client.head(path)
        after = samples((await client.get("/metrics")).text)

    before = samples(first_page.text)
    # Only the body of the first page was sent in between.
    grown = value(after, "resize_proxy_response_bytes_total") - value(before, "resize_proxy_response_bytes_total")
    assert grown == len(first_page.content)


async def test_access_line_error_quoted(s3, bucket, settings_for, caplog):
    settings = settings_for(storage=f"s3://{bucket}")
    caplog.set_level(logging.INFO, logger="proxy.access_log")

    async with running_app(settings) as client:
        response = await client.get("/r/a%20status=200%20layer=memory-360.jpg")

    lines = [record.getMessage() for record in caplog.records if record.name == "proxy.access_log"]
    line = next(line for line in lines if "status=404" in line)
    # Split as a logfmt reader would: the quoted error is one field.
    keys = [field.split("=", 1)[0] for field in shlex.split(line)]
    assert response.status_code == 404
    assert keys.count("status") == 1
    assert keys.count("layer") == 1
    assert json.loads(line.split(" error=", 1)[1]) == response.text.strip()


async def test_long_path_cut_in_access_line(s3, bucket, settings_for, caplog):
    settings = settings_for(storage=f"s3://{bucket}")
    caplog.set_level(logging.INFO, logger="proxy.access_log")
    path = "/r/" + "x" * 6000 + "-720.jpg"

    async with running_app(settings) as client:
        response = await client.get(path)

    request_id = f"id={response.headers['x-request-id']} "
    line = next(record.getMessage() for record in caplog.records if request_id in record.getMessage())
    logged_path = line.split(" path=", 1)[1].split(" ", 1)[0]
    assert response.status_code in (400, 404)
    assert logged_path == path[: access_log.MAX_LOGGED_PATH] + "..."
    assert len(line.encode()) < 4096


def test_quoted_path_json_line_fits_pipe():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    access_logger = logging.getLogger("proxy.access_log")
    level = access_logger.level
    access_logger.addHandler(handler)
    access_logger.setLevel(logging.INFO)
    # The HTTP parser lets `"` through unescaped, and JSON escapes each one.
    scope = {"method": "GET", "path": "/r/x", "raw_path": b"/r/" + b'"' * 6000 + b"-720.jpg"}
    try:
        access_log.log_request(scope, "quoted", 400, time.perf_counter(), None, "bad path", "variant", 10)
    finally:
        access_logger.removeHandler(handler)
        access_logger.setLevel(level)

    (line,) = stream.getvalue().splitlines()
    assert len(line.encode()) <= 4096
    assert json.loads(line)["message"].startswith("request id=quoted ")
