"""Resolve: read a .brick file and its imports, and bind every declared name.

Produces the symbol table (name -> declaration and the directory its paths are relative
to) and the root file's settings. Every problem (syntax errors, unknown keywords,
duplicate names, missing or cyclic imports, unknown settings) is carried to the checker
so that one run reports them together with its own. A statement with a syntax error is
left out, but the name it declares is kept as `broken`, so that references to it are not
reported as unknown names; an import that does not parse, or a file that cannot be read
as text, makes the program `incomplete` (any undeclared name may be declared there).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cfmlang.frontend import ast
from cfmlang.frontend.to_ast import UNFIT, parse_recovering
from cfmlang.diagnostics import CompileError, Diagnostic, Span, did_you_mean, error, warning

KEYWORDS, SETTINGS = ast.KEYWORDS, ast.SETTINGS


@dataclass(frozen=True)
class Declared:
    decl: ast.Decl
    base_dir: Path


@dataclass(frozen=True)
class Resolved:
    root: str
    symbols: tuple[tuple[str, Declared], ...]
    settings: tuple[ast.Setting, ...]
    files: tuple[tuple[str, str], ...]
    problems: tuple[Diagnostic, ...]
    broken: frozenset[str] = frozenset()
    """Names declared by statements left out for a syntax error."""
    incomplete: bool = False
    """An import could not be read: any undeclared name may be declared in it."""

    def table(self) -> dict[str, Declared]:
        return dict(self.symbols)

    def may_declare(self, name: str) -> bool:
        """Whether `name`, which no statement that parsed declares, may still be declared
        by one that did not (so an unknown-name error would be a consequence, not news)."""
        return self.incomplete or name in self.broken


def read_source(path: Path, file: str) -> str:
    """The text of a .brick file; E143 when it is not UTF-8 text (a binary file)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CompileError([_binary_error(data, exc.start, file, "is not UTF-8 text")]) from None
    if "\0" in text:
        raise CompileError([_binary_error(data, data.index(0), file, "contains a NUL byte")]) from None
    return text


def checked_text(text: str, file: str) -> str:
    """Program text given as a string: E143 when it cannot be UTF-8 text (a lone surrogate
    character) or holds a NUL character, as for a file."""
    found = UNFIT.search(text)
    if found is None:
        return text
    bad = found.start()
    line = text.count("\n", 0, bad) + 1
    col = bad - (text.rfind("\n", 0, bad) + 1) + 1
    what = "contains a NUL character" if text[bad] == "\0" else \
        f"holds a lone surrogate U+{ord(text[bad]):04X}, which is not text"
    raise CompileError([error("E143", f"`{file}` {what} (character {bad})", Span.point(file, line, col),
                              "program text is Unicode text that UTF-8 can encode")])


def _binary_error(data: bytes, offset: int, file: str, what: str) -> Diagnostic:
    line = data.count(b"\n", 0, offset) + 1
    col = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    return error("E143", f"`{Path(file).name}` {what} (byte {offset}: 0x{data[offset]:02x})",
                 Span.point(file, line, col), "a .brick file is UTF-8 text; is this a binary file?")


def stdlib_path(name: str) -> Path:
    return Path(str(resources.files("cfmlang.frontend").joinpath(name)))


def resolve(text: str, file: str, base_dir: Path, program: ast.Program | None = None) -> Resolved:
    """`program`: the root file's text already parsed (parse_recovering), if it was."""
    state = _Loader()
    root_key = str(Path(file).resolve()) if Path(file).is_file() else file
    state.load_text(text, file, base_dir, importer=None, key=root_key, project=base_dir.resolve(),
                    program=program)
    return Resolved(file, tuple(state.symbols.items()), tuple(state.root_settings),
                    tuple(state.files), tuple(state.problems), frozenset(state.broken), state.incomplete)


MAX_IMPORT_DEPTH = 100
"""The longest chain of files importing each other (a.brick imports b.brick, which
imports c.brick ...) that is read; loading recurses once per file."""


class _Loader:
    def __init__(self):
        self.problems: list[Diagnostic] = []
        self.symbols: dict[str, Declared] = {}
        self.root_settings: list[ast.Setting] = []
        self.files: list[tuple[str, str]] = []
        self.stack: list[str] = []
        self.loaded: set[str] = set()
        self.broken: set[str] = set()
        self.incomplete = False

    def load_text(self, text: str, file: str, base_dir: Path, importer: ast.Import | None,
                  key: str, project: Path, program: ast.Program | None = None):
        """`project` is the directory tree that relative imports of this file must stay in."""
        self.files.append((file, hashlib.sha256(text.encode()).hexdigest()))
        try:
            program = program or parse_recovering(text, file)
        except CompileError as exc:      # nothing of the file could be kept
            self.problems += exc.diagnostics
            self.incomplete = True
            return
        self.problems += program.problems
        self.broken.update(b.name for b in program.broken if b.name is not None)
        self.incomplete = self.incomplete or any(b.is_import for b in program.broken)
        self.stack.append(key)
        for statement in program.statements:
            if isinstance(statement, ast.Import):
                self.import_file(statement, base_dir, project)
            elif isinstance(statement, ast.Setting):
                self.setting(statement, is_root=importer is None)
            else:
                self.declare(statement, base_dir)
        self.stack.pop()

    def declare(self, decl: ast.Decl, base_dir: Path):
        if decl.keyword == "import":
            self.problems.append(error("E010", "`import` takes a quoted path, not a declaration",
                                       decl.keyword_span, 'write `import "path.brick"`'))
            return
        if decl.keyword not in KEYWORDS:
            hint = did_you_mean(decl.keyword, KEYWORDS + ("import",))
            self.problems.append(error(
                "E010", f"unknown statement keyword `{decl.keyword}`", decl.keyword_span,
                hint or f"a declaration starts with one of: {', '.join(KEYWORDS)}"))
            return
        first = self.symbols.get(decl.name)
        if first is not None:
            s = first.decl.name_span
            self.problems.append(error(
                "E011", f"`{decl.name}` is declared twice", decl.name_span,
                "rename one of them", notes=[f"first declared at {s.file}:{s.line}:{s.col}"]))
            return
        self.symbols[decl.name] = Declared(decl, base_dir)

    def setting(self, setting: ast.Setting, is_root: bool):
        if setting.key in KEYWORDS:
            self.problems.append(error(
                "E015", f"`{setting.key}` declares a node and needs a name", setting.key_span,
                f"write `{setting.key} NAME:` followed by its body"))
        elif setting.key not in SETTINGS:
            self.problems.append(error(
                "E015", f"unknown file-level setting `{setting.key}`", setting.key_span,
                did_you_mean(setting.key, SETTINGS + KEYWORDS) or
                f"settings are {', '.join(SETTINGS)}; declarations look like `model NAME:`"))
        elif any(s.key == setting.key for s in self.root_settings) and is_root:
            self.problems.append(error("E012", f"setting `{setting.key}` is given twice",
                                       setting.key_span, "keep one of them"))
        elif is_root:
            self.root_settings.append(setting)
        else:
            self.problems.append(warning("W002", f"setting `{setting.key}` in an imported file "
                                         "is ignored", setting.key_span,
                                         "only the compiled file's settings apply"))

    def import_file(self, node: ast.Import, base_dir: Path, project: Path):
        if node.keyword != "import":
            self.problems.append(error("E010", f"unknown statement keyword `{node.keyword}`",
                                       node.keyword_span, did_you_mean(node.keyword, ("import",))
                                       or 'an import reads `import "path.brick"`'))
            return
        path, project = import_target(node.path, base_dir, project)
        if path is None:
            self.problems.append(escape_error(node, project))
            return
        key = str(path)
        if len(self.stack) >= MAX_IMPORT_DEPTH:
            self.problems.append(error("E311", f"imports nest more than {MAX_IMPORT_DEPTH} files deep here "
                                       f"(`{node.path}` would be file {len(self.stack) + 1} of the chain)",
                                       node.path_span, "import the files from one file instead of each from "
                                       "the one before"))
            return
        if key in self.stack:
            self.problems.append(error("E041", f"import cycle: `{node.path}` imports itself "
                                       "through this chain", node.path_span,
                                       "remove one of the imports in the cycle"))
            return
        if key in self.loaded:
            return
        if not path.is_file():
            hint = ("the standard library has: " + ", ".join(
                "std/" + p.name for p in sorted(stdlib_path("std").glob("*.brick")))
                if node.path.startswith("std/") else "import paths are relative to the importing file")
            self.problems.append(error("E040", f"cannot find `{node.path}`", node.path_span, hint))
            return
        self.loaded.add(key)
        try:
            text = read_source(path, str(path))
        except CompileError as exc:
            self.problems += exc.diagnostics
            self.incomplete = True
            return
        self.load_text(text, str(path), path.parent, importer=node, key=key, project=project)


def import_target(given: str, base_dir: Path, project: Path) -> tuple[Path | None, Path]:
    """(resolved file, project of that file), or (None, the tree it left).

    `std/...` stays inside the standard library; an absolute path is explicit and may go
    anywhere (its directory becomes the project of its own imports); any other path is
    relative to the importing file and, symlinks resolved, must stay inside `project`."""
    if given.startswith("std/"):
        library = stdlib_path("std").resolve()
        path = stdlib_path(given).resolve()
        return (path if path.is_relative_to(library) else None), library
    if Path(given).is_absolute():
        path = Path(given).resolve()
        return path, path.parent
    path = (base_dir / given).resolve()
    return (path if path.is_relative_to(project) else None), project


def escape_error(node: ast.Import, project: Path) -> Diagnostic:
    if node.path.startswith("std/"):
        return error("E140", f"`{node.path}` leaves the standard library", node.path_span,
                     "name a file of the standard library, e.g. `std/smollm2.brick`")
    return error("E140", f"`{node.path}` resolves outside the project directory {project}",
                 node.path_span, "relative imports (symlinks followed) stay inside the compiled "
                 "file's directory; write an absolute path to import a file from elsewhere")
