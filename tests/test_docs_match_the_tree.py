"""docs/architecture.md and docs/adding-a-service.md describe the tree as it is."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from crm_common.registry import SERVICES

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text()
ADDING = (ROOT / "docs" / "adding-a-service.md").read_text()
COMMON = ROOT / "common" / "src" / "crm_common"

#: The modules of the write-service shape (docs/architecture.md), each a module
#: or a package; `rest_api` may be a `rest/` package instead.
SHAPE = ("domain/", "inputs.py", "validation.py", "application.py", "views.py",
         "messages.py", "events_out.py", "grpc_api.py", "main.py")  # fmt: skip

BUILT_WRITE_SERVICES = [s.name for s in SERVICES if s.writes_events and not s.planned]


def _exists(package: Path, name: str) -> bool:
    if name.endswith("/"):
        return (package / name / "__init__.py").is_file()
    return (package / name).is_file()


def test_the_architecture_names_every_module_of_the_shape() -> None:
    for module in (*SHAPE, "rest_api.py"):
        assert f"`{module}" in ARCHITECTURE, module


@pytest.mark.parametrize("service", BUILT_WRITE_SERVICES)
def test_every_write_service_has_the_modules_of_the_shape(service: str) -> None:
    package = ROOT / "services" / service / "src" / f"crm_{service}"
    missing = [m for m in SHAPE if not _exists(package, m)]
    assert not missing, f"{service} lacks {missing}"
    assert _exists(package, "rest_api.py") or _exists(package, "rest/")
    readme = (ROOT / "services" / service / "README.md").read_text()
    for module in SHAPE:
        assert module.rstrip("/") in readme, f"{service}/README.md does not name {module}"


def test_the_shared_library_table_lists_every_module_and_nothing_else() -> None:
    section = ARCHITECTURE.split("## The shared library", 1)[1].split("\n## ", 1)[0]
    named = set()
    for cell in re.findall(r"^\| ([^|]+) \|", section, re.M):
        named.update(re.findall(r"`(\w+)`", cell))
    modules = {p.stem for p in COMMON.glob("*.py") if p.stem != "__init__"}
    modules |= {p.parent.name for p in COMMON.glob("*/__init__.py")}
    assert named == modules


@pytest.mark.parametrize("service", [s.name for s in SERVICES if not s.planned])
def test_every_module_a_service_readme_names_exists(service: str) -> None:
    readme = (ROOT / "services" / service / "README.md").read_text()
    package = ROOT / "services" / service / "src" / f"crm_{service}"
    named = set(re.findall(r"`([a-z_0-9/]+\.py|[a-z_0-9]+/)`", readme))
    assert named, f"{service}/README.md names none of its modules"
    # A module of a sub-package (`persons.py` of `domain/`), or a test, may be named alone.
    folder = ROOT / "services" / service
    missing = sorted(
        n
        for n in named
        if not _exists(package, n) and not any(folder.rglob(n)) and not (ROOT / n).exists()
    )
    assert not missing, f"{service}/README.md names modules that do not exist: {missing}"


def test_the_adding_a_service_guide_names_what_exists() -> None:
    for path in re.findall(r"`((?:common|services|helm|deploy|proto)/[\w./-]+)`", ADDING):
        if "<svc>" in path or "<" in path:
            continue
        assert (ROOT / path).exists(), path
    for command in re.findall(r"`make (\w+)`", ADDING):
        assert re.search(rf"^{command}:", (ROOT / "Makefile").read_text(), re.M), command
