"""The package's layering (tools/import_graph.py): no import cycle, no import of a higher layer, no backend
importing another, the app reaching backends through the registry only."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
import import_graph  # noqa: E402


def test_import_graph_has_no_violations():
    """Every module of src/saef obeys the layering rules stated in tools/import_graph.py."""
    edges = import_graph.graph()
    assert len(edges) > 30 and "saef.core.algorithm" in edges
    assert import_graph.violations(edges) == []


def test_the_check_catches_an_upward_import_and_a_cycle():
    """The check is not vacuous: an import from core into the app, a backend importing another, and a
    cycle are each reported."""
    edges = {name: set(targets) for name, targets in import_graph.graph().items()}
    edges["saef.core.algorithm"].add("saef.app.loop")
    edges["saef.backends.distributed"].add("saef.backends.simulator")
    edges["saef.compress.base"].add("saef.compress.sign")
    problems = "\n".join(import_graph.violations(edges))
    assert "saef.core.algorithm imports saef.app.loop" in problems
    assert "one backend imports another" in problems
    assert "import cycle" in problems
