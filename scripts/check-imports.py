#!/usr/bin/env python3
"""Fails when modules of a crate import each other, directly or around a longer circle.

Usage: scripts/check-imports.py [SRC_DIR ...]   (default: src)

A module's imports are the `crate::`, `super::` and `self::` paths in its file, resolved to
the longest module they name. A parent declaring `mod child;` is not an import; a parent using
an item of its child is, and so is a child using an item of its parent.
"""
import re
import sys
from pathlib import Path

PATH = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
USE_GROUP = re.compile(r"\buse\s+(crate|super|self)::\{([^;]*)\}", re.S)


def module_of(src: Path, file: Path) -> tuple:
    parts = list(file.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def strip_comments(text: str) -> str:
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def references(text: str):
    for head, group in USE_GROUP.findall(text):
        for item in re.split(r",", group):
            name = item.strip().split("::")[0].split(" ")[0]
            if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name or ""):
                yield head, [name] + item.strip().split("::")[1:]
    for head, rest in PATH.findall(text):
        yield head, rest.strip(":").split("::")


def resolve(modules: set, here: tuple, is_dir_module: bool, head: str, names: list):
    if head == "crate":
        base = ()
    elif head == "self":
        base = here
    else:  # super: the parent of this module
        base = here[:-1]
    path = base
    for name in names:
        if path + (name,) in modules:
            path = path + (name,)
        else:
            break
    return path


def check(src: Path) -> list:
    files = [f for f in src.rglob("*.rs") if "bin" not in f.relative_to(src).parts[:1]]
    modules = {module_of(src, f) for f in files}
    edges = {}
    for file in files:
        here = module_of(src, file)
        text = strip_comments(file.read_text())
        # Test modules may use anything of their parent.
        text = text.split("#[cfg(test)]\nmod tests")[0]
        for head, names in references(text):
            target = resolve(modules, here, file.name == "mod.rs", head, names)
            if target != here:
                edges.setdefault(here, set()).add(target)
        # A child module named without a prefix (`child::item`, `use child::Item`).
        for child in re.findall(r"^\s*(?:pub(?:\([a-z]+\))?\s+)?mod\s+([a-z_0-9]+)\s*;", text, re.M):
            if re.search(rf"(?<![:\w]){child}::", text):
                edges.setdefault(here, set()).add(here + (child,))
    return find_cycles(modules, edges)


def find_cycles(modules, edges):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted("::".join(m) for m in component))

    for m in sorted(modules):
        if m not in index:
            visit(m)
    return out


def main() -> int:
    roots = [Path(p) for p in sys.argv[1:]] or [Path("src")]
    failed = False
    for src in roots:
        for cycle in check(src):
            failed = True
            print(f"{src}: modules import each other: {' <-> '.join(cycle)}")
    if not failed:
        print(f"no import circles in {', '.join(map(str, roots))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
