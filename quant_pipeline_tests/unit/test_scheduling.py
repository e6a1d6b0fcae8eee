"""The order `make test` hands test files to its workers in (quant_pipeline_tests/scheduling.py)."""

from pathlib import Path
from types import SimpleNamespace

from quant_pipeline_tests.scheduling import FILE_SECONDS, heaviest_files_first

TESTS = Path(__file__).resolve().parents[1]


def test_every_file_measured_as_heavy_still_exists():
    """A renamed heavy file would silently drop to the back of the queue: the table must name real files."""
    assert [name for name in FILE_SECONDS if not (TESTS / name).is_file()] == []


def test_the_heaviest_files_go_first_whole_and_the_rest_keep_their_collection_order():
    ids = [
        "quant_pipeline_tests/unit/core/test_hashing.py::a",
        "quant_pipeline_tests/e2e/test_methods.py::x",
        "quant_pipeline_tests/unit/core/test_hashing.py::b",
        "quant_pipeline_tests/e2e/test_methods.py::y",
        "quant_pipeline_tests/e2e/test_default_model.py::z",
        "quant_pipeline_tests/unit/test_architecture.py::c",
    ]
    ordered = [item.nodeid for item in heaviest_files_first([SimpleNamespace(nodeid=i) for i in ids])]
    assert ordered == [ids[4], ids[1], ids[3], ids[0], ids[2], ids[5]]


def test_make_test_keeps_the_collection_order_instead_of_xdists_most_tests_first():
    makefile = (TESTS.parent / "Makefile").read_text()
    runs = [line for line in makefile.splitlines() if "-m pytest" in line]
    assert runs and all("--dist loadfile --no-loadscope-reorder" in line for line in runs)
