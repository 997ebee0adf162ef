"""The Comfy Registry metadata in pyproject.toml: it parses, carries the fields the registry and
ComfyUI read, and names exactly the dependencies of requirements.txt (what a git clone installs)."""
from __future__ import annotations

import re
import tomllib

import pytest

from harness.paths import REPO_ROOT

PYPROJECT = REPO_ROOT / "pyproject.toml"
REQUIREMENTS = REPO_ROOT / "requirements.txt"


def metadata() -> dict:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def normalized(requirement: str) -> str:
    return "".join(requirement.split()).lower()


def requirements_txt() -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in REQUIREMENTS.read_text().splitlines())
    return [line for line in lines if line]


def test_project_table_has_the_registry_fields():
    project = metadata()["project"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", project["name"])
    assert len(project["name"]) < 100
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"]
    assert set(project["license"]) <= {"file", "text"} and any(project["license"].values())


def test_tool_comfy_table_has_the_registry_fields():
    comfy = metadata()["tool"]["comfy"]
    assert {"PublisherId", "DisplayName", "includes"} <= set(comfy)
    assert comfy["DisplayName"]
    assert isinstance(comfy["includes"], list)


def test_dependencies_are_exactly_requirements_txt():
    declared = sorted(normalized(dep) for dep in metadata()["project"]["dependencies"])
    assert declared == sorted(normalized(req) for req in requirements_txt())
    assert not [dep for dep in declared if re.match(r"torch(vision|audio)?\b", dep)]


@pytest.mark.comfyui
def test_comfyui_reads_the_metadata(comfy_inprocess):
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(REPO_ROOT))
    project, comfy = metadata()["project"], metadata()["tool"]["comfy"]
    assert config.project.name == project["name"]
    assert config.project.version == project["version"]
    assert config.tool_comfy.display_name == comfy["DisplayName"]
    assert config.project.supported_comfyui_version == comfy["requires-comfyui"]
    assert config.project.supported_accelerators == ["GPU :: NVIDIA CUDA"]


def test_registry_ready_publisher_and_licence():
    """Publishing needs a publisher id; the licence is ComfyUI's (GPL-3.0), shipped as LICENSE."""
    data = metadata()
    assert data["tool"]["comfy"]["PublisherId"] == "comfyui-chipmunk"
    licence = REPO_ROOT / data["project"]["license"]["file"]
    assert "GNU GENERAL PUBLIC LICENSE" in licence.read_text() and "Version 3" in licence.read_text()
