#!/usr/bin/env python3
"""Fails when a crate's modules import each other in a cycle.

Within each crate of the workspace, module A depends on module B when A's
code names `crate::B...` (or `super::...`/`self::...` resolving to B). A
module's own submodules and ancestors are not counted as edges back: a
child sees its parent's items by design, so parent -> child -> parent is
the module tree, not a cycle. Any other cycle (admin -> relay -> retention
-> admin) is reported with its path, and the script exits 1.

Usage: infra/local/cycles.py [crate dirs...] (default: every crate in the
workspace that has a src/ directory).
"""
import os
import re
import sys

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def modules(src):
    """Maps module path (tuple) -> file, for a crate's src directory."""
    mods = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(root, f), src)[:-3].split(os.sep)
            if rel[-1] == "mod":
                rel = rel[:-1]
            if rel in (["lib"], ["main"]):
                rel = []
            elif len(rel) == 1 and src.endswith("src") and os.path.isdir(os.path.join(src, "bin")) and rel[0] == "bin":
                continue
            if rel and rel[0] == "bin":
                continue  # separate binaries, each a crate of its own
            mods[tuple(rel)] = os.path.join(root, f)
    return mods


def expand(path):
    """`a::{b, c::{d}}` -> [a::b, a::c::d] (paths as lists)."""
    path = path.strip()
    m = re.match(r"^(.*?)\{(.*)\}$", path, re.S)
    if not m:
        return [[p for p in path.split("::") if p]]
    prefix = [p for p in m.group(1).split("::") if p]
    out, depth, cur = [], 0, ""
    for ch in m.group(2):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    res = []
    for part in out:
        if part.strip():
            for tail in expand(part):
                res.append(prefix + tail)
    return res


def references(text):
    """Module-relative paths the code names: ('crate'|'super'|'self', [segments])."""
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//"))
    refs = []
    # use statements, with brace groups
    for m in re.finditer(r"\buse\s+((?:crate|super|self)(?:::" + IDENT + r")*(?:::\{[^;]*\})?)\s*(?:as\s+" + IDENT + r")?;", code, re.S):
        for segs in expand(m.group(1)):
            refs.append(segs)
    # inline paths
    for m in re.finditer(r"\b((?:crate|super|self)(?:::" + IDENT + r")+)", code):
        refs.append(m.group(1).split("::"))
    return refs


def resolve(mod, segs, known):
    """Turns a reference into the module it names (the longest known prefix)."""
    if not segs:
        return None
    head, rest = segs[0], segs[1:]
    if head == "crate":
        base = ()
    elif head == "self":
        base = mod
    else:
        base = mod
        while rest or head == "super":
            if head != "super":
                break
            base = base[:-1]
            if not rest:
                break
            head, rest = rest[0], rest[1:]
        else:
            pass
        if head != "super":
            rest = [head] + rest
    best = None
    for i in range(len(rest) + 1):
        cand = tuple(base) + tuple(rest[:i])
        if cand in known:
            best = cand
    return best


def cycles_of(crate):
    src = os.path.join(crate, "src")
    mods = modules(src)
    known = set(mods)
    edges = {m: set() for m in mods}
    for mod, path in mods.items():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        refs = references(text)
        # A bare path to a child module (`retention::run`) names it too.
        code = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("//"))
        for m in re.finditer(r"(?<![:\w])(" + IDENT + r")::", code):
            if mod + (m.group(1),) in known:
                refs.append(["self", m.group(1)])
        for segs in refs:
            target = resolve(mod, segs, known)
            if target is None or target == mod or target == ():
                continue
            if mod[: len(target)] == target:
                continue  # an ancestor: the module tree, not a dependency back
            edges[mod].add(target)
    # Tarjan's strongly connected components.
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    found = []
    for comp in sccs:
        # one concrete cycle through the component, for the message
        start = sorted(comp)[0]
        path, seen, cur = [start], {start}, start
        while True:
            nxt = sorted(w for w in edges[cur] if w in comp)
            step = next((w for w in nxt if w == start and len(path) > 1), None) or next((w for w in nxt if w not in seen), None)
            if step is None or step == start:
                path.append(start)
                break
            path.append(step)
            seen.add(step)
            cur = step
        found.append(" -> ".join("::".join(m) for m in path))
    return found


def main():
    crates = sys.argv[1:]
    if not crates:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        crates = []
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in ("target", ".git", "node_modules")]
            if "Cargo.toml" in files and os.path.isdir(os.path.join(dirpath, "src")):
                crates.append(dirpath)
    bad = 0
    for crate in sorted(crates):
        for cycle in cycles_of(crate):
            print(f"module cycle in {os.path.relpath(crate)}: {cycle}")
            bad += 1
    if bad:
        print(f"{bad} module cycle(s): move what both sides need into a module both may import")
        return 1
    print(f"no module cycles in {len(crates)} crates")
    return 0


if __name__ == "__main__":
    sys.exit(main())
