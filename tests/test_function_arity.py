"""No function of the library takes more than MAX_PARAMETERS parameters (issue #16): settings travel as
typed objects (DacSettings, ObjectiveSettings, SamplingOptions, ScrgSettings, PreprocessOptions, ...),
not as long lists of keywords.

Counted: positional-only, ordinary and keyword-only parameters, `*args` and `**kwargs` one each; a first
parameter named `self` or `cls` is not counted (`ctx` of an autograd Function's forward is)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mgsr_megatron"
MAX_PARAMETERS = 8


def parameter_count(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> int:
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    count = len(positional) + len(args.kwonlyargs) + (args.vararg is not None) + (args.kwarg is not None)
    if positional and positional[0].arg in ("self", "cls"):
        count -= 1
    return count


def over_the_limit(root: Path = PACKAGE, limit: int = MAX_PARAMETERS) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                count = parameter_count(node)
                if count > limit:
                    name = getattr(node, "name", "<lambda>")
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {name} takes {count} parameters")
    return found


def test_no_library_function_takes_more_than_eight_parameters():
    assert PACKAGE.is_dir()
    offenders = over_the_limit()
    assert not offenders, (f"functions with more than {MAX_PARAMETERS} parameters (group settings into a "
                           f"frozen dataclass built once from the config):\n" + "\n".join(offenders))


def test_the_count(tmp_path):
    """The counting rule itself: self/cls are free, *args and **kwargs count one each."""
    source = ("def f(a, b, /, c, *args, d, **kwargs): pass\n"
              "class C:\n"
              "    def m(self, a, b): pass\n"
              "    @classmethod\n"
              "    def k(cls, *, a): pass\n"
              "    @staticmethod\n"
              "    def forward(ctx, a, *params): pass\n")
    counts = {node.name: parameter_count(node) for node in ast.walk(ast.parse(source))
              if isinstance(node, ast.FunctionDef)}
    assert counts == {"f": 6, "m": 2, "k": 1, "forward": 3}
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "wide.py").write_text("def wide(a, b, c, d, e, f, g, h, *rest): pass\n"
                                     "def fine(a, b, c, d, e, f, g, h): pass\n")
    assert over_the_limit(package) == ["pkg/wide.py:1 wide takes 9 parameters"]
