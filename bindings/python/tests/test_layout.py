"""The ctypes mirrors of amend.h's structs and signatures must match the header exactly (a
drifted struct is memory corruption, not an error)."""
import ctypes
import os
import re
from pathlib import Path

import pytest

import amend

HEADER = os.environ.get("AMEND_HEADER") or str(Path(__file__).resolve().parents[3] / "include" / "amend.h")

C_TYPES = {
    "bool": ctypes.c_bool,
    "uint32_t": ctypes.c_uint32,
    "int32_t": ctypes.c_int32,
    "uint64_t": ctypes.c_uint64,
    "float": ctypes.c_float,
    "double": ctypes.c_double,
    "amend_token": ctypes.c_int32,
    "enum amend_stop_reason": ctypes.c_int,
    "const char *": ctypes.c_char_p,
    "size_t": ctypes.c_size_t,
    "amend_backend": ctypes.c_uint32,
}

STRUCTS = {
    "amend_model_params": amend._ModelParams,
    "amend_model_info": amend._ModelInfo,
    "amend_session_params": amend._SessionParams,
    "amend_generate_params": amend._GenerateParams,
    "amend_generation": amend._Generation,
    "amend_score": amend._Score,
    "amend_edit_activity": amend._EditActivity,
    "amend_bundle_info": amend._BundleInfo,
}


def header_text():
    if not Path(HEADER).is_file():
        pytest.skip(f"{HEADER} not found (set AMEND_HEADER)")
    text = Path(HEADER).read_text()
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_matches_header(name):
    m = re.search(r"typedef struct " + name + r" \{(.*?)\} " + name + ";", header_text(), re.S)
    assert m, f"{name} not in the header"
    fields = []
    for line in m.group(1).strip().splitlines():
        line = line.strip().rstrip(";")
        if not line:
            continue
        ctype, field = line.rsplit(" ", 1)
        if field.startswith("*"):
            ctype, field = ctype + " *", field[1:]
        fields.append((field, C_TYPES[ctype]))
    assert [(f, t) for f, t in STRUCTS[name]._fields_] == fields


def test_every_header_function_has_a_signature():
    names = set(re.findall(r"\b(amend_\w+)\(", header_text()))
    missing = sorted(n for n in names if n not in amend._SIGNATURES and not n.endswith("_callback"))
    assert missing == [], f"functions without a ctypes signature: {missing}"
