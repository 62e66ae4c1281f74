"""Imports point one way: between the packages (formats imports neither hv nor migrate; hv does not
import migrate), between hv's layers (`HV_LAYERS`, lowest first) and migrate's (`MIGRATE_LAYERS`),
and with no circle in either."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"formats": {"hv", "migrate"}, "hv": {"migrate", "formats"}}

# hv's layers, lowest first; a module may import its own layer and the ones below it. `errors` is
# the shared root, `persist` (the protocols every stateful object implements) stands on it; the `hv` package itself (its __init__) re-exports from above, so it is the top.
HV_LAYERS = ("errors", "persist", "binding", "kvm", "platform", "boot", "devices", "guests", "vmm", "api",
             "conformance", "__init__")


# migrate's layers, lowest first, each the folders or top-level modules in it; a module may import
# its own layer and the ones below. `protocol` (the messages and the exchange's table, sans-IO) is
# the root: errors carry its ErrorCode and the transport its messages. `datapath` (the C page
# path) needs only the errors, the transport (frames, connections, TLS, the listener) only the
# protocol and the errors; the model (what a migration is made of:
# a machine's state, its pages, digests, records, options, stats, progress events, disks) stands
# on it (options name a Tls); snapshots use the model, and the live engine stands above them (it
# uses none today; a live snapshot or a local hand-over, built there, may); the commands behind
# the CLI and the control socket, then the CLI, then the package's re-exports.
MIGRATE_LAYERS: tuple[tuple[str, ...], ...] = (
    ("protocol",), ("errors",), ("datapath",), ("transport",),
    ("stats", "events", "options", "disks", "state", "pages", "digest", "records"),
    ("snapshot",), ("live",), ("commands",), ("cli",), ("__init__",))


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, runtime) for every absolute import in `path`; `runtime` is False
    for imports under `if TYPE_CHECKING:`, which annotations need but executing the module does
    not. `from pkg import name` counts as importing `pkg.name` when that is a module."""
    tree = ast.parse(path.read_text(), str(path))
    type_only = {id(n) for node in ast.walk(tree)
                 if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                 for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        runtime = id(node) not in type_only
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, runtime) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub if _module_path(sub) else node.module, node.lineno, runtime))
    return found


def _module_path(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    """hv.kvm.vm -> the index of "kvm"; hv -> the package's own (top) layer."""
    parts = module.split(".")
    return HV_LAYERS.index(parts[1] if len(parts) > 1 else "__init__")


HV_FILES = sorted((ROOT / "hv").rglob("*.py"))
MIGRATE_FILES = sorted((ROOT / "migrate").rglob("*.py"))


def _migrate_layer(module: str) -> int | None:
    """migrate.live.source -> the index of the layer holding "live"; migrate -> the top; None if
    the module is in no declared layer."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "__init__"
    return next((i for i, layer in enumerate(MIGRATE_LAYERS) if name in layer), None)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    for path in files:
        bad = {m.split(".")[0] for m, _, _ in _imports(path)} & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_every_hv_module_is_in_a_declared_layer() -> None:
    unplaced = [str(p.relative_to(ROOT)) for p in HV_FILES
                if (p.relative_to(ROOT / "hv").parts[0].removesuffix(".py")) not in HV_LAYERS]
    assert not unplaced, f"modules outside HV_LAYERS: {unplaced}"


@pytest.mark.parametrize("path", HV_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hv_imports_point_down_the_layers(path: Path) -> None:
    here = _module_name(path)
    upward = [f"line {line}: {module} ({HV_LAYERS[_layer(module)]} is above {HV_LAYERS[_layer(here)]})"
              for module, line, _ in _imports(path)
              if module.split(".")[0] == "hv" and _layer(module) > _layer(here)]
    assert not upward, f"{path.relative_to(ROOT)} imports upward: {upward}"


def test_every_migrate_module_is_in_a_declared_layer() -> None:
    unplaced = [str(p.relative_to(ROOT)) for p in MIGRATE_FILES if _migrate_layer(_module_name(p)) is None]
    assert not unplaced, f"modules outside MIGRATE_LAYERS: {unplaced}"


def test_migrate_layers_name_what_is_there() -> None:
    """Each name of a layer is a folder or a module of migrate: a layer list that drifts from the
    tree would pin nothing."""
    names = [name for layer in MIGRATE_LAYERS for name in layer if name != "__init__"]
    missing = [n for n in names if _module_path(f"migrate.{n}") is None]
    assert not missing, f"MIGRATE_LAYERS names what migrate does not have: {missing}"
    assert len(names) == len(set(names))


@pytest.mark.parametrize("path", MIGRATE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_migrate_imports_point_down_the_layers(path: Path) -> None:
    here = _migrate_layer(_module_name(path))
    assert here is not None
    upward = [f"line {line}: {module} (layer {_migrate_layer(module)} is above {here})"
              for module, line, _ in _imports(path)
              if module.split(".")[0] == "migrate" and (_migrate_layer(module) or 0) > here]
    assert not upward, f"{path.relative_to(ROOT)} imports upward: {upward}"


def test_the_layer_check_sees_an_upward_import() -> None:
    """The check above can fail: a module of the transport that named the live engine would."""
    assert _migrate_layer("migrate.live.source") > _migrate_layer("migrate.transport.connection")
    assert _migrate_layer("migrate.errors") < _migrate_layer("migrate.state") < _migrate_layer("migrate.cli")


def _runtime_graph(package: str = "hv", files: list[Path] = HV_FILES) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in files:
        deps = graph.setdefault(_module_name(path), set())
        for module, _, runtime in _imports(path):
            if runtime and module.split(".")[0] == package and _module_path(module):
                deps.add(module)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> list[str] | None:
        if node in trail:
            return trail[trail.index(node):] + [node]
        if node in done:
            return None
        for dep in sorted(graph.get(node, ())):
            if cycle := visit(dep, [*trail, node]):
                return cycle
        done.add(node)
        return None

    return next((c for node in sorted(graph) if (c := visit(node, []))), None)


def test_hv_has_no_import_cycle() -> None:
    # the package's __init__ re-exports, so every submodule "imports" it implicitly: leave it out
    graph = {m: deps - {"hv"} for m, deps in _runtime_graph().items() if m != "hv"}
    assert len(graph) > 30  # the walk saw the package
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_migrate_has_no_import_cycle() -> None:
    graph = {m: deps - {"migrate"} for m, deps in _runtime_graph("migrate", MIGRATE_FILES).items() if m != "migrate"}
    assert len(graph) > 30
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
