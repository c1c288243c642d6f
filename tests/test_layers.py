"""The agent's layers: imports point down only, no module imports itself back, the operator keeps out.

Every ``import`` counts, also those inside functions (a lazy import is a
dependency all the same). Layers, lowest first:

    contract                      names and defaults shared with the operator
    flows                         record, cache, dedup (pure Python)
    datapath                      program, pinned tables, tc, namespaces
    export                        sinks: IPFIX, JSON lines
    collector                     the built-in collector
    config, labelselector         the configuration schema
    kube                          Kubernetes node mode's parts
    daemon, kubeagent, metrics(http), depcheck, cli   the process
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"kipfix.agent": ROOT / "agent", "kipfix.operator": ROOT / "operator"}
LAYERS = [
    {"contract"},
    {"flows"},
    {"datapath"},
    {"export"},
    {"collector"},
    {"config", "labelselector"},
    {"kube"},
    {"daemon", "kubeagent", "metrics", "metricshttp", "depcheck", "cli"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}
KNOWN_CYCLES: list[list[str]] = []
# What the operator may take from the agent: the shared contract, the pure schema and the API client set-up.
OPERATOR_MAY_IMPORT = ("kipfix.agent.contract", "kipfix.agent.config", "kipfix.agent.config.rules",
                       "kipfix.agent.labelselector", "kipfix.agent.export.address", "kipfix.agent.kube.client")


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every kipfix module ``name`` imports (a ``from X import y`` counts X.y when that is a module)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name, path, set(modules())) for name, path in modules().items()}


def layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[:2] != ["kipfix", "agent"] or len(parts) < 3:
        return None
    return LAYER_OF.get(parts[2])


def test_every_agent_module_has_a_layer():
    unplaced = [m for m in GRAPH if m.startswith("kipfix.agent.") and layer(m) is None
                and m.split(".")[2] not in ("data",)]
    assert unplaced == []


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("kipfix.agent.")))
def test_imports_point_down(module):
    upward = sorted(target for target in GRAPH[module]
                    if layer(target) is not None and layer(module) is not None and layer(target) > layer(module))
    assert upward == [], f"{module} (layer {layer(module)}) imports from higher layers"


def test_the_agent_never_imports_the_operator():
    assert sorted(m for m, targets in GRAPH.items() if m.startswith("kipfix.agent")
                  for t in targets if t.startswith("kipfix.operator")
                  and not (m == "kipfix.agent.cli" and t == "kipfix.operator.__main__")) == []


def test_the_operator_imports_only_the_contract_and_the_schema():
    bad = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if m.startswith("kipfix.operator")
                 for t in targets if t.startswith("kipfix.agent") and t not in OPERATOR_MAY_IMPORT
                 and t != "kipfix.agent")
    assert bad == []


def test_no_import_cycles():
    # Tarjan's strongly connected components; a component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH.get(node, ()):
            if target not in GRAPH:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            # a package importing its own submodules (and back) is how packages work, not a cycle
            if len(component) > 1 and not all(c.startswith(min(component, key=len) + ".") or
                                               c == min(component, key=len) for c in component):
                cycles.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    assert cycles == KNOWN_CYCLES
