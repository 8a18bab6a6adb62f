"""The layering `make lint` checks with import-linter, plus what it cannot express: no two
modules of ours import each other, directly or through others, not even for type checking
(grimp reads `if TYPE_CHECKING:` imports like any other)."""

from __future__ import annotations

from pathlib import Path

import grimp
import pytest

PACKAGES = (
    "tilebridge_protocol",
    "tilebridge_runtime",
    "tilebridge_storage",
    "edge_agent",
    "server_ingest",
    "tilebridge_imswitch",
)


def import_cycles(graph: grimp.ImportGraph) -> set[tuple[str, ...]]:
    cycles = set()
    for importer in graph.modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            if imported == importer:
                continue
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is not None:
                cycles.add((importer, *back))
    return cycles


def test_no_module_imports_itself_through_others() -> None:
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    assert import_cycles(graph) == set()


def test_the_cycle_check_finds_a_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cyclic import b\n"
    )
    (package / "b.py").write_text("from cyclic import c\n")
    (package / "c.py").write_text("from cyclic import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("cyclic", cache_dir=None)
    assert ("cyclic.a", "cyclic.b", "cyclic.c", "cyclic.a") in import_cycles(graph)
