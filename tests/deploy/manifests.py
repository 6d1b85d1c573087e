"""Readers for the deployment files: Dockerfile instructions, .dockerignore matching, YAML documents, settings.

Small and strict on purpose: the tests built on them check the files statically because no container engine or
cluster is available where they run.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pathguard.service.settings import Settings
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS_DIR = DEPLOY / "prometheus"
RULES = PROMETHEUS_DIR / "rules" / "pathguard.rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "pathguard.json"

SETTING_ENV_NAMES = frozenset(f"PATHGUARD_{name.upper()}" for name in Settings.model_fields)
WILDCARD_HOSTS = {"0.0.0.0", "::"}


# --- Dockerfile ------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case, e.g. "RUN"
    args: str  # the rest of the logical line, continuations joined

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction (``CMD ["a", "b"]``), else None."""
        text = re.sub(r"^(?:--\S+\s+)*", "", self.args.strip())
        if not text.startswith("["):
            return None
        value = yaml.safe_load(text)
        assert isinstance(value, list), f"{self.keyword} {self.args!r} is not a JSON array"
        return [str(v) for v in value]


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        """Every ENV of the stage (``K=V`` pairs, later ones win)."""
        out: dict[str, str] = {}
        for inst in self.all("ENV"):
            parts = shlex.split(inst.args)
            if len(parts) == 2 and "=" not in parts[0]:  # legacy "ENV KEY value"
                out[parts[0]] = parts[1]
                continue
            for part in parts:
                key, _, value = part.partition("=")
                out[key] = value
        return out


def _logical_lines(text: str) -> Iterator[str]:
    buf: list[str] = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # comment lines inside a continuation are dropped by Docker
        if line.endswith("\\"):
            buf.append(line[:-1])
            continue
        buf.append(line)
        yield " ".join(part.strip() for part in buf)
        buf = []
    assert not buf, "Dockerfile ends inside a line continuation"


def parse_dockerfile(path: Path = DOCKERFILE) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages of ``path``."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text()):
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--")]
            base = words[0]
            for key, value in global_args.items():
                base = base.replace("${" + key + "}", value).replace("$" + key, value)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            if keyword == "ARG":
                key, _, value = args.partition("=")
                global_args[key.strip()] = value.strip()
        else:
            stages[-1].instructions.append(Instruction(keyword, args.strip()))
    return global_args, stages


def copy_parts(inst: Instruction) -> tuple[dict[str, str], list[str], str]:
    """``COPY [--flag=value ...] src... dest`` -> (flags, sources, destination)."""
    words = inst.exec_form() or shlex.split(inst.args)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    return flags, words[:-1], words[-1]


# --- .dockerignore ---------------------------------------------------------------------------------------


def ignore_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out.append(pattern[i : end + 1])
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def dockerignore_rules(path: Path = DOCKERIGNORE) -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per rule, in file order."""
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:] if negated else line
        rules.append((negated, ignore_regex(pattern.strip("/"))))
    return rules


def in_build_context(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether ``rel`` (a path relative to the context) is sent: Docker's rule, the last matching pattern wins,
    and a pattern matching a parent folder matches everything below it."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    included = True
    for negated, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            included = negated
    return included


# --- YAML ------------------------------------------------------------------------------------------------


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    for d in docs:
        assert isinstance(d, dict), f"{path}: a document is not a mapping"
    return docs


def k8s_documents() -> dict[Path, list[dict[str, Any]]]:
    """Every Kubernetes manifest under deploy/kubernetes and deploy/kserve."""
    files = sorted((DEPLOY / "kubernetes").glob("*.yaml")) + sorted((DEPLOY / "kserve").glob("*.yaml"))
    return {f: load_yaml_documents(f) for f in files}


def configmap_data() -> dict[str, str]:
    (doc,) = load_yaml_documents(DEPLOY / "kubernetes" / "configmap.yaml")
    assert doc["kind"] == "ConfigMap"
    return dict(doc["data"])


def load_healthcheck() -> Any:
    """deploy/docker/healthcheck.py as a module (it is copied into the image, not installed)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pathguard_healthcheck", DEPLOY / "docker" / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- settings --------------------------------------------------------------------------------------------


def settings_from_env(env: dict[str, str], monkeypatch: Any) -> Settings:
    """Validate ``env`` exactly the way the service reads it: as PATHGUARD_* environment variables."""
    import os

    for key in list(os.environ):
        if key.startswith("PATHGUARD_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    return Settings()
