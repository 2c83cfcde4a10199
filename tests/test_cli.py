"""The `resize-proxy` command line: option checks, start-up warnings, and scripts/setup.sh."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from proxy.cli import _parser


def usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Parse options that argparse must reject, and return its stderr.

    Only the parser runs, so an option that is wrongly accepted fails the test
    instead of starting a server or worker.
    """
    with pytest.raises(SystemExit) as raised:
        _parser().parse_args(argv)
    assert raised.value.code == 2
    return capsys.readouterr().err


# Option checks


@pytest.mark.parametrize(
    ("argv", "option", "shown_value"),
    [
        (["serve", "--port", "99999"], "--port", "99999"),
        (["serve", "--port", "65536"], "--port", "65536"),
        (["serve", "--port", "0"], "--port", "0"),
        (["serve", "--port", "-1"], "--port", "-1"),
        (["serve", "--port", "http"], "--port", "'http'"),
        (["serve", "--workers", "0"], "--workers", "0"),
        (["serve", "--workers", "-3"], "--workers", "-3"),
        (["worker", "--queue-url", "http://127.0.0.1/q", "--concurrency", "0"], "--concurrency", "0"),
        (["backfill", "--concurrency", "-1"], "--concurrency", "-1"),
        (["backfill", "--concurrency", "2.5"], "--concurrency", "'2.5'"),
    ],
)
def test_invalid_option_value_exits_2(capsys: pytest.CaptureFixture[str], argv: list[str], option: str, shown_value: str):
    stderr = usage_error(capsys, argv)

    assert f"argument {option}: {shown_value} " in stderr
    assert "use " in stderr
    assert "Traceback" not in stderr


def test_port_message_names_range(capsys: pytest.CaptureFixture[str]):
    stderr = usage_error(capsys, ["serve", "--port", "99999"])

    assert "99999 is out of range; use 1 to 65535" in stderr


@pytest.mark.parametrize("port", ["1", "8080", "65535"])
def test_port_range_limits_accepted(port: str):
    assert _parser().parse_args(["serve", "--port", port]).port == int(port)


def test_workers_one_accepted():
    assert _parser().parse_args(["serve", "--workers", "1"]).workers == 1


def test_backfill_concurrency_zero_accepted():
    # 0 means as many sources at once as there are resize threads.
    assert _parser().parse_args(["backfill", "--concurrency", "0"]).concurrency == 0


def test_worker_concurrency_one_accepted():
    args = _parser().parse_args(["worker", "--queue-url", "http://127.0.0.1/q", "--concurrency", "1"])

    assert args.concurrency == 1


# Unknown PROXY_* variables


def run_command(tmp_path: Path, argv: list[str], variables: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `python -m proxy` in `tmp_path` with only the given PROXY_* variables set."""
    env = {name: value for name, value in os.environ.items() if not name.upper().startswith("PROXY_")}
    env.update(variables)
    return subprocess.run(
        [sys.executable, "-m", "proxy", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_misspelled_variable_warns_and_runs(tmp_path: Path):
    result = run_command(
        tmp_path, ["backfill", "--dry-run"], {"PROXY_STORAGE": str(tmp_path), "PROXY_WIDHTS": "720"}
    )

    assert result.returncode == 0, result.stderr
    assert "unknown variable PROXY_WIDHTS is ignored. Did you mean PROXY_WIDTHS?" in result.stderr
    assert result.stderr.count("PROXY_WIDHTS") == 1
    assert "dry run" in result.stdout


def test_misspelled_variable_named_with_error(tmp_path: Path):
    # PROXY_STORAGE is unset, so the default ./images is missing from tmp_path.
    result = run_command(tmp_path, ["backfill", "--dry-run"], {"PROXY_STORGE": str(tmp_path)})

    assert result.returncode == 2
    assert "Did you mean PROXY_STORAGE?" in result.stderr
    assert "invalid PROXY_STORAGE='./images'" in result.stderr
    assert "Traceback" not in result.stderr


# scripts/setup.sh


@pytest.fixture
def fake_venv(tmp_path: Path) -> Path:
    """A virtual environment whose python only appends its arguments to calls.log."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path / "calls.log"}\n')
    python.chmod(0o755)
    return venv


def install_rounds(venv: Path, calls: str) -> list[str]:
    """Source scripts/setup.sh, run `calls` in bash, and return every project install so far."""
    env = {**os.environ, "RESIZE_PROXY_VENV": str(venv)}
    script = f'source "{REPO}/scripts/setup.sh"; {calls}'
    subprocess.run(["bash", "-c", script], env=env, check=True, capture_output=True, timeout=60)
    log = venv.parent / "calls.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [line for line in lines if "--editable" in line]


def test_setup_test_extra_satisfies_serve(fake_venv: Path):
    after_first = install_rounds(fake_venv, 'install_project test; install_project ""')
    after_second = install_rounds(fake_venv, 'install_project test; install_project ""')

    assert after_first == [f"-m pip install --quiet --editable {REPO}[test]"]
    assert after_second == after_first


def test_setup_serve_then_test_installs_once_each(fake_venv: Path):
    after_first = install_rounds(fake_venv, 'install_project ""; install_project test')
    after_second = install_rounds(fake_venv, 'install_project ""; install_project test')

    assert after_first == [
        f"-m pip install --quiet --editable {REPO}",
        f"-m pip install --quiet --editable {REPO}[test]",
    ]
    assert after_second == after_first


def test_setup_reinstalls_after_pyproject_change(fake_venv: Path):
    install_rounds(fake_venv, "install_project test")
    stamp = fake_venv / ".resize-proxy-installed"
    stamp.write_text("0" * 64 + "\ntest\n")

    calls = install_rounds(fake_venv, 'install_project ""')

    assert calls[-1] == f"-m pip install --quiet --editable {REPO}"
    assert len(calls) == 2
