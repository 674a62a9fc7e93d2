"""The packages' shape: no module of r1mega or r1mega_kernels reaches into another module's privates.

A name with a leading underscore is its module's own business; code elsewhere that imports it (or
a private module such as ``x/_helpers.py``) breaks when that module is reworked. This test parses
every module under ``r1mega/`` and ``kernels/r1mega_kernels/`` with :mod:`ast` (nothing is
imported) and lists every

* ``from X import _name`` and ``from X._mod import name`` (a private name or module),
* ``import a._b`` (a private module),
* ``mod._name`` where ``mod`` is bound by an import to a module (``import a.b as mod``,
  ``from a import mod`` where ``a/mod.py`` or ``a/mod/`` exists),

except those in :data:`ALLOWED`. Dunder names (``__version__``, ``__future__``) are public.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (ROOT / "r1mega", ROOT / "kernels" / "r1mega_kernels")

# Only this repository's names count: a third-party module's privates (``os._exit``, megatron's
# that r1mega.megatron_compat patches) are that project's contract with its users, not ours.
FIRST_PARTY = ("r1mega", "r1mega_kernels")
# (importing module, private module or name): the compiled extension r1mega._batching belongs to
# its one wrapper, r1mega.batching.balance.
ALLOWED = {("r1mega.batching.balance", "r1mega._batching")}


def is_private(name: str) -> bool:
    """A leading underscore, not a dunder."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_first_party_module(dotted: str, root: Path) -> bool:
    """Whether `dotted` names a module or package under `root` (this repository: r1mega.*)."""
    base = root.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module of ``from ... import`` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def private_part(dotted: str) -> str | None:
    """The first private component of a dotted module name, or None."""
    return next((part for part in dotted.split(".") if is_private(part)), None)


class Scanner(ast.NodeVisitor):
    """Collects the violations of one module; tracks names bound to modules per scope."""

    def __init__(self, module: str, is_package: bool, rel: str, root: Path):
        self.module, self.is_package, self.rel, self.root = module, is_package, rel, root
        self.scopes: list[dict[str, str | None]] = [{}]  # name -> module it is bound to (None: shadowed)
        self.found: list[str] = []

    def report(self, node: ast.AST, what: str, target: str) -> None:
        if target.split(".")[0] in FIRST_PARTY and (self.module, target) not in ALLOWED:
            self.found.append(f"{self.rel}:{node.lineno}: {what}")

    def bind(self, name: str, target: str | None) -> None:
        self.scopes[-1][name] = target

    def lookup(self, name: str) -> str | None:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        return None

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if private_part(alias.name):
                self.report(node, f"import {alias.name}", alias.name)
            if alias.asname:
                self.bind(alias.asname, alias.name)
            else:
                root = alias.name.split(".")[0]
                self.bind(root, root)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        source = resolve_from(node, self.module, self.is_package)
        if source == "__future__":
            return
        if private_part(source):
            self.report(node, f"from {source} import ...", source)
        for alias in node.names:
            if alias.name == "*":
                continue
            full = f"{source}.{alias.name}"
            if is_private(alias.name):
                self.report(node, f"from {source} import {alias.name}", full)
            bound = alias.asname or alias.name
            self.bind(bound, full if is_first_party_module(full, self.root) else None)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain, inner = [node.attr], node.value
        while isinstance(inner, ast.Attribute):
            chain.append(inner.attr)
            inner = inner.value
        if isinstance(inner, ast.Name) and is_private(node.attr):
            target = self.lookup(inner.id)
            if target is not None:
                dotted = ".".join([target, *reversed(chain[1:])])
                if dotted != self.module:
                    self.report(node, f"{dotted}.{node.attr}", f"{dotted}.{node.attr}")
        self.generic_visit(node)

    def _scoped(self, node, params: list[str]) -> None:
        self.scopes.append({name: None for name in params})
        self.generic_visit(node)
        self.scopes.pop()

    def visit_FunctionDef(self, node) -> None:
        for deco in node.decorator_list:
            self.visit(deco)
        args = node.args
        names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
        names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
        self._scoped(node, names)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        args = node.args
        self._scoped(node, [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs])

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._scoped(node, [])


def violations(package: Path) -> list[str]:
    """Every cross-module private import or module-attribute access under `package`."""
    root, found = package.parent, []
    for path in sorted(package.rglob("*.py")):
        rel = str(path.relative_to(root))
        scanner = Scanner(module_name(path, root), path.name == "__init__.py", rel, root)
        scanner.visit(ast.parse(path.read_text(), filename=rel))
        found += scanner.found
    return found


def test_no_module_imports_another_modules_private_names():
    found = [v for package in PACKAGES for v in violations(package)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_scanner_finds_each_kind(tmp_path):
    pkg = tmp_path / "r1mega"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "mod.py").write_text("_x = 1\n")
    (pkg / "user.py").write_text(
        "from __future__ import annotations\n"
        "import os, torch._dynamo\n"  # third-party privates are not ours to police
        "os._exit\n"
        "import r1mega.sub._hidden\n"
        "from r1mega.sub.mod import _x\n"
        "from r1mega.sub._hidden import y\n"
        "from .sub import _x as z\n"
        "from r1mega.sub import mod\n"
        "import r1mega.sub.mod as m2\n"
        "from r1mega.sub.mod import __doc__\n"
        "mod._x\n"
        "m2._x\n"
        "def f(mod):\n"
        "    return mod._x\n"  # a parameter shadows the import: not a module
        "obj = object()\n"
        "obj._x\n")
    found = violations(pkg)
    lines = [f.split(": ", 1)[1] for f in found]
    assert lines == ["import r1mega.sub._hidden", "from r1mega.sub.mod import _x", "from r1mega.sub._hidden import ...",
                     "from r1mega.sub import _x", "r1mega.sub.mod._x", "r1mega.sub.mod._x"], found
