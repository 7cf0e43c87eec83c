import os
from pathlib import Path

import pytest

# Where scripts/fetch-model.sh puts it: $AMEND_CACHE (unless empty), else ~/.cache/amend.
CACHE = Path(os.environ.get("AMEND_CACHE") or Path.home() / ".cache/amend")
MODEL = os.environ.get("AMEND_MODEL") or str(CACHE / "gemma3-270m-q4_k_m.gguf")


@pytest.fixture(scope="session")
def model_path():
    if not Path(MODEL).is_file():
        if os.environ.get("AMEND_REQUIRE_MODEL") == "1":
            pytest.fail(f"model {MODEL} missing (AMEND_REQUIRE_MODEL=1)")
        pytest.skip(f"model {MODEL} missing")
    return MODEL


@pytest.fixture(scope="session")
def model(model_path):
    import amend

    m = amend.Model(model_path)
    yield m
    m.close()


@pytest.fixture
def session(model):
    import amend

    s = amend.Session(model, n_ctx=512)
    yield s
    s.close()
