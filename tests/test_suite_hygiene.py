"""The suite imports its helpers as top-level modules (``from test_speculative import ...``; pytest puts tests/
on sys.path): flow_matching, installed by the peers extra, ships a top-level package named ``tests`` that
``from tests.test_x import ...`` would resolve to instead of ours."""
import re
from pathlib import Path


def test_no_test_imports_through_a_tests_package():
    pattern = re.compile(r"^\s*(from|import)\s+tests(\.|\s|$)", re.M)
    bad = [p.name for p in sorted(Path(__file__).parent.glob("*.py")) if pattern.search(p.read_text())]
    assert not bad, f"{bad} import through a 'tests' package; import the module directly (from test_x import ...)"
