"""Static checks of the Dockerfile and .dockerignore (no container engine here: correct by construction)."""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from pathguard.service.settings import Settings
from tests.conftest import ROOT
from tests.deploy.manifests import (
    SETTING_ENV_NAMES,
    WILDCARD_HOSTS,
    Instruction,
    Stage,
    copy_parts,
    dockerignore_rules,
    ignore_regex,
    in_build_context,
    load_healthcheck,
    parse_dockerfile,
    settings_from_env,
)

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SERVING = {Requirement(r).name for r in PYPROJECT["project"]["dependencies"]}
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
EVAL_ONLY = {Requirement(r).name for r in EXTRAS["eval"]} - SERVING - {"pathguard"}
BUILD_ONLY = {Requirement(r).name for r in EXTRAS["build"]} - SERVING


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile()[1]


@pytest.fixture(scope="module")
def final(stages) -> Stage:
    return stages[-1]


def _runs(stage: Stage) -> str:
    return "\n".join(i.args for i in stage.all("RUN"))


def test_multi_stage_build_copies_only_the_serving_virtualenv_and_the_bundle(stages, final):
    assert [s.name for s in stages] == ["build", "serve", "runtime"]
    from_copies = [copy_parts(i) for i in final.all("COPY") if copy_parts(i)[0].get("from")]
    bundle = final.env()["PATHGUARD_BUNDLE"]
    assert from_copies == [({"from": "serve"}, ["/opt/venv"], "/opt/venv"), ({"from": "build"}, [bundle], bundle)]
    # the runtime stage installs nothing itself: no pip, no compilers
    assert "pip install" not in _runs(final)
    assert all(s.base.startswith("python:3.11-slim") for s in stages), [s.base for s in stages]


def test_cpu_torch_from_the_cpu_index_with_the_project_pin(stages):
    build = stages[0]
    m = re.search(r"pip install \$PIP_OPTIONS torch==(\S+) \$TORCH_SOURCE", _runs(build))
    assert m, "torch is installed on its own from TORCH_SOURCE"
    (version,) = m.groups()
    # online by default: the CPU wheel index, no extra pip options (offline builds override both, docs/deploy.md)
    words = {k: " ".join(shlex.split(v)).split() for k, v in parse_dockerfile()[0].items()}  # as RUN's shell sees it
    assert words["TORCH_SOURCE"] == ["--index-url", "https://download.pytorch.org/whl/cpu"]
    assert words["PIP_OPTIONS"] == []
    assert {"TORCH_SOURCE", "PIP_OPTIONS"} <= {i.args for i in build.all("ARG")}, "the build stage sees both"
    makefile_pin = re.search(r"pip install --quiet torch==(\S+)", (ROOT / "Makefile").read_text())
    assert makefile_pin and makefile_pin.group(1) == version, "the image and `make install` use the same torch"
    (torch_req,) = [Requirement(r) for r in EXTRAS["build"] if r.startswith("torch")]
    assert torch_req.specifier.contains(Version(version)), "pyproject's torch range must accept the pinned build"
    # the pin is kept for every later install and the build fails if a CUDA build slipped in
    assert f'echo "torch=={version}" > /opt/constraints.txt' in _runs(build)
    assert build.env()["PIP_CONSTRAINT"] == "/opt/constraints.txt"
    assert "torch.version.cuda is None" in _runs(build)
    torch_line = next(i for i, inst in enumerate(build.instructions) if " torch==" in inst.args and "pip" in inst.args)
    deps_line = next(i for i, inst in enumerate(build.instructions) if "pip install $PIP_OPTIONS -r" in inst.args)
    assert torch_line < deps_line, "CPU torch before the dependencies, or pip pulls a CUDA build"


def test_only_serving_dependencies_are_in_the_serving_virtualenv(stages):
    build, serve, _ = stages
    assert "torch" in BUILD_ONLY and "torch" not in SERVING, "torch is the builder's, not the server's"
    for stage in (build, serve):
        installs = re.findall(r"pip install ([^&\n]+)", _runs(stage))
        assert installs, f"no pip install found in {stage.name}"
        for args in installs:
            assert "[" not in args, f"no extras by name (they would pull the eval extra): pip install {args}"
            for name in EVAL_ONLY | {"torchattacks", "torchvision"}:
                assert name not in args
        assert "pip install $PIP_OPTIONS --no-deps ." in _runs(stage)
    # the builder: the serving dependencies and the build extra; the server: [project].dependencies only, no torch
    assert "['dependencies'] + p['optional-dependencies']['build']" in _runs(build)
    serve_runs = _runs(serve)
    assert "['project']['dependencies']))" in serve_runs and "optional-dependencies" not in serve_runs
    assert "torch" not in serve_runs.replace("find_spec('torch') is None", "").replace("torch in the serving", "")
    assert "find_spec('torch') is None" in serve_runs, "the build fails if torch reached the serving virtualenv"
    assert EVAL_ONLY, "the eval extra must hold packages the service does not need"


def test_project_sources_are_copied_before_the_install(stages):
    build = stages[0]
    copied: set[str] = set()
    for inst in build.instructions:
        if inst.keyword == "COPY":
            copied.update(copy_parts(inst)[1])
        if inst.keyword == "RUN" and "--no-deps ." in inst.args:
            break
    folders = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    assert folders == {"models", "service"}
    for folder in folders:
        assert folder in copied, f"package folder {folder} is copied"
    assert {"pyproject.toml", "README.md", "LICENSE"} <= copied  # readme and license files of the metadata


def test_non_root_numeric_user(final):
    users = final.all("USER")
    assert users, "the runtime stage sets USER"
    uid, _, gid = users[-1].args.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0, "numeric ids: runAsNonRoot can check"
    runs = _runs(final)
    assert f"useradd --system --uid {uid} --gid {gid}" in runs
    last_user = max(i for i, inst in enumerate(final.instructions) if inst.keyword == "USER")
    assert not [inst for inst in final.instructions[last_user:] if inst.keyword in {"RUN", "COPY", "ADD"}], (
        "nothing is installed after dropping root"
    )
    # the only writable folder belongs to the service user, and it is where the spool goes
    spool_dir = final.env()["PATHGUARD_SPOOL_PATH"].rsplit("/", 1)[0]
    assert f"chown {uid}:{gid} {spool_dir}" in runs
    assert final.all("VOLUME")[0].exec_form() == [spool_dir]


def test_default_bundle_baked_in_with_its_stored_graph_and_verified(stages, final):
    env = final.env()
    default = Settings.model_fields["bundle"].default
    build = stages[0]
    copies = {copy_parts(i)[1][0]: copy_parts(i)[2] for i in build.all("COPY") if not copy_parts(i)[0]}
    assert copies.get(default.as_posix()) == env["PATHGUARD_BUNDLE"], "the settings' default bundle is copied"
    stores = [i.exec_form() for i in build.all("RUN") if "--in-bundle" in i.args]
    assert stores == [["pathguard", "export", env["PATHGUARD_BUNDLE"], "--in-bundle"]], "its guarded graph stored"
    assert env["PATHGUARD_BUNDLE"].endswith("/" + default.as_posix())
    verify = [i.exec_form() for i in final.all("RUN") if "verify" in i.args]
    assert verify == [["pathguard", "verify", env["PATHGUARD_BUNDLE"]]], "a tampered bundle fails the build"


def test_environment_is_valid_pathguard_settings(final, monkeypatch):
    env = final.env()
    pathguard = {k: v for k, v in env.items() if k.startswith("PATHGUARD_")}
    assert set(pathguard) <= SETTING_ENV_NAMES, set(pathguard) - SETTING_ENV_NAMES
    settings = settings_from_env(pathguard, monkeypatch)
    assert settings.host in WILDCARD_HOSTS, "reachable from outside the container"
    assert [int(p) for i in final.all("EXPOSE") for p in i.args.split()] == [settings.port, settings.grpc_port]
    assert env["PATH"].startswith("/opt/venv/bin:")


def test_healthcheck_probes_readiness_with_the_copied_script(final):
    (hc,) = final.all("HEALTHCHECK")
    flags = dict(re.findall(r"--([a-z-]+)=(\S+)", hc.args))
    assert {"interval", "timeout", "start-period", "retries"} <= set(flags)
    cmd = Instruction("CMD", hc.args.split("CMD", 1)[1]).exec_form()
    assert cmd is not None and cmd[0] == "python"
    copies = {copy_parts(i)[2]: copy_parts(i)[1][0] for i in final.all("COPY") if not copy_parts(i)[0]}
    script = ROOT / copies[cmd[1]]
    assert script.is_file()
    assert "/v2/health/ready" in script.read_text()


def test_healthcheck_url_follows_the_settings():
    ready_url = load_healthcheck().ready_url

    assert ready_url({}) == "http://127.0.0.1:8080/v2/health/ready"
    assert ready_url({"PATHGUARD_HOST": "0.0.0.0", "PATHGUARD_PORT": "9000"}) == (
        "http://127.0.0.1:9000/v2/health/ready"
    )
    assert ready_url({"PATHGUARD_HOST": "::1"}) == "http://[::1]:8080/v2/health/ready"
    assert ready_url({"PATHGUARD_HOST": "10.1.2.3"}) == "http://10.1.2.3:8080/v2/health/ready"


def test_entrypoint_is_the_pathguard_cli(final):
    assert final.all("ENTRYPOINT")[-1].exec_form() == ["pathguard"]
    assert final.all("CMD")[-1].exec_form() == ["serve"]
    assert "pathguard" in PYPROJECT["project"]["scripts"]


def _tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if (ROOT / line).is_file()]


def test_dockerignore_sends_exactly_what_the_dockerfile_copies(stages):
    rules = dockerignore_rules()
    context = [f for f in _tracked_files() if in_build_context(f, rules)]
    sources = [src for s in stages for i in s.all("COPY") if not copy_parts(i)[0] for src in copy_parts(i)[1]]
    for src in sources:
        assert (ROOT / src).exists(), f"COPY source {src} is missing"
        below = [f for f in _tracked_files() if f == src or f.startswith(src + "/")]
        assert below, f"COPY source {src} has no files"
        dropped = [f for f in below if not in_build_context(f, rules) and "__pycache__" not in f]
        assert not dropped, f".dockerignore drops files the Dockerfile copies: {dropped[:5]}"
    for f in context:
        assert any(f == s or f.startswith(s + "/") for s in sources), f"{f} is sent but never copied"
    for never in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "runs/x", "artifacts/classifiers/x"):
        assert not in_build_context(never, rules), never


def test_dockerignore_matcher_semantics():
    assert in_build_context("anything", [])
    rules = [(False, ignore_regex("*")), (True, ignore_regex("models")), (False, ignore_regex("**/__pycache__"))]
    assert in_build_context("models/nic/detector.py", rules)
    assert not in_build_context("models/__pycache__/cli.cpython-311.pyc", rules)
    assert not in_build_context("service/app.py", rules)
    assert not in_build_context("modelsx/a.py", rules)


def test_shell_lines_parse(stages):
    """Every shell-form RUN is valid shell: ``sh -n`` parses it without running it (an unbalanced quote, a dangling
    ``&&`` or a stray ``fi`` fails here, not half-way through a build)."""
    lines = [inst.args for stage in stages for inst in stage.all("RUN") if inst.exec_form() is None]
    assert len(lines) >= 4, lines
    for line in lines:
        parsed = subprocess.run(["sh", "-n", "-c", line], capture_output=True, text=True)
        assert parsed.returncode == 0, f"{line}\n{parsed.stderr}"
