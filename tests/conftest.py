import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """The built-in toy datasets, generated once per test session."""
    from tools.make_toy_data import main

    out = tmp_path_factory.mktemp("toy")
    main(["--out", str(out), "--seed", "0"])
    return out
