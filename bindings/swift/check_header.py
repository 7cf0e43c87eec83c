#!/usr/bin/env python3
"""Checks the Swift binding against include/amend.h without a Swift toolchain.

1. Every `amend_*` function the Swift sources call is declared in the header.
2. Each is called with as many arguments as the header declares.
3. Each one's prototype equals the one pinned in c-api-used.txt (so a header change that
   touches a function Swift uses fails here until the Swift code is reviewed and the pin
   updated with --bless), and the pin lists exactly the functions Swift uses.
4. Every `amend_*` type and constant Swift names exists in the header.
5. Every field Swift reads or sets on a C struct it made (`var p = amend_x_default_params()`,
   `var s = amend_score()`) is a field of that struct in the header.
6. No `baseAddress!` outside `withUTF8Bytes`: an empty array has no base address, so "" would
   trap the host app instead of reaching amend's error.
7. No Swift String is passed straight to a `const char *` of the C API (`amend_f(..., text)`)
   except after `refuseNul`: a C string is cut at a NUL, so amend would act on another path or
   id.
Prints "N passed, N failed".
"""
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEADER = HERE.parent.parent / "include" / "amend.h"
PIN = HERE / "c-api-used.txt"


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    return re.sub(r"(?m)^\s*#.*$", " ", text)  # preprocessor lines


def norm(s):
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"\s*\*\s*", " *", s).replace("* *", "**")
    return re.sub(r"\s*([(),;])\s*", r"\1", s).replace(",", ", ")


def header_api():
    text = strip_comments(HEADER.read_text())
    protos = {}
    for m in re.finditer(r"([A-Za-z_][\w\s\*]*?)\b(amend_\w+)\s*\(([^;{]*?)\)\s*;", text):
        ret, name, params = m.group(1), m.group(2), m.group(3)
        ret = ret.split(";")[-1].split("}")[-1].strip()
        if ret.startswith("typedef"):
            continue
        n = 0 if params.strip() in ("", "void") else params.count(",") + 1
        protos[name] = (norm(f"{ret} {name}({params});"), n)
    types = set(re.findall(r"typedef\s+(?:struct|enum)\s+\w+\s*(?:\{[^}]*\})?\s*(amend_\w+)\s*;", text, flags=re.S))
    types |= set(re.findall(r"typedef\s+[^;]*?\(\s*\*\s*(amend_\w+)\s*\)", text))
    types |= set(re.findall(r"typedef\s+\w+\s+(amend_\w+)\s*;", text))
    consts = set(re.findall(r"\b(AMEND_\w+)\b", text))
    # Simple #define constants (AMEND_BACKEND_*) are imported by Swift as well.
    consts |= set(re.findall(r"(?m)^\s*#define\s+(AMEND_\w+)\s+\S", HEADER.read_text()))
    return protos, types, consts


def struct_fields():
    """Field names of each `typedef struct amend_x { ... } amend_x;` in the header."""
    text = strip_comments(HEADER.read_text())
    fields = {}
    for m in re.finditer(r"typedef\s+struct\s+(amend_\w+)\s*\{(.*?)\}\s*\1\s*;", text, flags=re.S):
        names = set()
        for decl in m.group(2).split(";"):
            f = re.search(r"(\w+)\s*(?:\[[^\]]*\])?\s*$", decl.strip())
            if f:
                names.add(f.group(1))
        fields[m.group(1)] = names
    return fields


def field_uses(src, protos):
    """(variable's struct, field) for each `v.field` after `var v = amend_x...()`, the struct
    being what that call returns; a later `var v = ...` rebinds v."""
    binds = []
    for m in re.finditer(r"\bvar\s+(\w+)\s*=\s*(amend_\w+)\s*\(\s*\)", src):
        name, call = m.group(1), m.group(2)
        ret = re.match(r"(?:struct\s+)?(amend_\w+)\s+" + call + r"\(", protos[call][0]) if call in protos else None
        struct = ret.group(1) if ret else call  # `amend_score()`: Swift's zeroed-struct init
        binds.append((m.start(), name, struct))
    uses = []
    for m in re.finditer(r"\b(\w+)\.([a-z_][a-z0-9_]*)\b", src):
        owner = [b for b in binds if b[1] == m.group(1) and b[0] < m.start()]
        if owner:
            uses.append((owner[-1][2], m.group(2)))
    return uses


def call_arg_counts(src, name):
    """Argument counts of each call `name(...)` in src (top-level commas, balanced brackets)."""
    counts = []
    for m in re.finditer(r"\b" + name + r"\s*\(", src):
        i, depth, commas, empty = m.end(), 1, 0, True
        while depth and i < len(src):
            c = src[i]
            if c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
            elif c == "," and depth == 1:
                commas += 1
            if depth and not c.isspace():
                empty = False
            i += 1
        counts.append(0 if empty else commas + 1)
    return counts


def main():
    bless = "--bless" in sys.argv
    protos, types, consts = header_api()
    src = "\n".join(p.read_text() for p in sorted((HERE / "Sources").rglob("*.swift")))
    src = re.sub(r"//[^\n]*", "", src)
    used = sorted(set(re.findall(r"\b(amend_\w+)\b", src)))
    funcs = [u for u in used if u in protos]
    passed = failed = 0

    def ok(cond, what):
        nonlocal passed, failed
        if cond:
            passed += 1
        else:
            failed += 1
            print("FAIL:", what)

    for u in used:
        ok(u in protos or u in types, f"{u} is used by Swift but not declared in amend.h")
    for c in sorted(set(re.findall(r"\b(AMEND_\w+)\b", src))):
        ok(c in consts, f"{c} is used by Swift but not in amend.h")
    for f in funcs:
        for n in call_arg_counts(src, f):
            ok(n == protos[f][1], f"{f} called with {n} arguments, amend.h declares {protos[f][1]}")
    if bless:
        PIN.write_text("".join(protos[f][0] + "\n" for f in funcs))
        print(f"wrote {PIN.name} ({len(funcs)} functions)")
    pinned = {}
    for line in PIN.read_text().splitlines():
        m = re.search(r"\b(amend_\w+)\(", line)
        if m:
            pinned[m.group(1)] = norm(line)
    ok(set(pinned) == set(funcs), f"c-api-used.txt lists {sorted(set(pinned) ^ set(funcs))} differently from the Swift sources")
    for f in funcs:
        if f in pinned:
            ok(pinned[f] == protos[f][0], f"signature changed: pinned {pinned[f]!r}, header {protos[f][0]!r}")
    ok(len(funcs) >= 15, f"only {len(funcs)} C functions found in the Swift sources")
    fields = struct_fields()
    uses = field_uses(src, protos)
    for struct, field in sorted(set(uses)):
        ok(field in fields.get(struct, ()), f"Swift uses {struct}.{field}, which amend.h does not declare")
    ok(len(set(uses)) >= 10, f"only {len(set(uses))} struct fields found in the Swift sources")
    bangs = [m.start() for m in re.finditer(r"baseAddress!", src)]
    helper = re.search(r"func withUTF8Bytes.*?\n}\n", src, flags=re.S)
    inside = [b for b in bangs if helper and helper.start() <= b < helper.end()]
    ok(len(bangs) == len(inside) and len(inside) == 1,
       f"{len(bangs) - len(inside)} `baseAddress!` outside withUTF8Bytes (\"\" traps there)")
    # String parameters of public functions that go to a C string must pass refuseNul first.
    for m in re.finditer(r"public (?:static )?(?:func (\w+)|init)\(([^)]*)\)", src):
        f, params = m.group(1) or "init", m.group(2)
        for name in re.findall(r"(\w+): String\b(?!\?)", params):
            body = src[m.start():]
            body = body[: body.find("\n    }\n") if "\n    }\n" in body else len(body)]
            direct = re.search(rf"amend_\w+\([^)]*\b{name}\b\s*[,)]", body)
            if direct:
                ok(f"refuseNul({name}" in body,
                   f"{f}: String {name} goes to a C string without refuseNul (cut at a NUL)")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
