"""The README's code shows kdfast's calls with their keywords: each keyword it gives a kdfast function, class or
trainer is one that callable takes, so that a renamed or removed setting cannot linger in the README."""

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _snippets() -> list[tuple[int, str]]:
    text = README.read_text()
    return [(text[:match.start()].count("\n") + 2, match.group(1))
            for match in re.finditer(r"```python\n(.*?)```", text, re.S)]


def _parsable(code: str) -> str:
    """The snippet with its elisions taken out: `f(x, ..., k=1)` and `(...)` stand for what the reader fills in."""
    code = re.sub(r"\(\.\.\.\)", "(_elided)", code)
    code = re.sub(r"([(,]\s*)\.\.\.,\s*", r"\1", code)  # a positional `...` (a keyword's `=...` stays)
    return re.sub(r",\s*\.\.\.\)", ")", code)


def _calls():
    """(line, dotted name, keywords) of every call of a kdfast name: `kdfast.x(...)`, or a name a snippet imported
    from a kdfast module (the latest import of it in the README's order)."""
    imported = {}
    found = []
    for line, code in _snippets():
        tree = ast.parse(_parsable(code))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kdfast"):
                imported.update({alias.asname or alias.name: f"{node.module}.{alias.name}" for alias in node.names})
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "kdfast":
                name = f"kdfast.{func.attr}"
            elif isinstance(func, ast.Name) and func.id in imported:
                name = imported[func.id]
            else:
                continue
            keywords = {kw.arg: kw.value for kw in node.keywords if kw.arg is not None}
            found.append((line + node.lineno - 1, name, keywords))
    return found


def _literal(node):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return _NOT_LITERAL


_NOT_LITERAL = object()


def _resolve(dotted: str):
    module_name, _, attribute = dotted.rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


def _accepted(target) -> set[str] | None:
    """The keyword names `target` takes, following a class's __init__ and any **kwargs it passes on to its base
    classes' __init__ (a trainer's); None where it takes any keyword at all."""
    if inspect.isclass(target):
        names: set[str] = set()
        for klass in target.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            params = inspect.signature(init).parameters.values()
            names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
            if not any(p.kind == p.VAR_KEYWORD for p in params):
                return names
        return None
    params = inspect.signature(target).parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def test_the_readme_shows_calls_of_kdfast():
    names = {name for _, name, _ in _calls()}
    assert {"kdfast.distill_loss", "kdfast.linear_distill_loss", "kdfast.cross_vocab_distill_loss"} <= names, names


@pytest.mark.parametrize("line,name,keywords",
                         [pytest.param(*call, id=f"line{call[0]}-{call[1]}") for call in _calls()])
def test_every_keyword_the_readme_gives_is_taken(line, name, keywords):
    if ".integrations." in name:
        pytest.importorskip("trl")
    target = _resolve(name)
    accepted = _accepted(target)
    if accepted is not None:
        unknown = [keyword for keyword in keywords if keyword not in accepted]
        assert not unknown, f"README.md line {line}: {name} takes no keyword {unknown}"
        return
    # A loss module takes its settings as **settings and names an unknown one: built with the README's values.
    values = {keyword: _literal(node) for keyword, node in keywords.items()}
    assert inspect.isclass(target) and all(value is not _NOT_LITERAL for value in values.values()), (
        f"README.md line {line}: {name} takes any keyword, and the README gives it values the test cannot build")
    target(**values)
