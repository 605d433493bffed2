"""Every requirement code cited in the repository is defined in docs/requirements.md, once, and every
test a definition names exists: a code cannot be cited without saying what it guarantees and what holds it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE = re.compile(r"R-[A-Z]+-[0-9]+")
DEFINITION = re.compile(r"^- \*\*(R-[A-Z]+-[0-9]+)\*\*: (.+)$")
TEST = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def cited_codes(root: Path = ROOT) -> dict[str, str]:
    """Code -> one file citing it, over src/, tests/, docs/, bench/ and README.md."""
    files = [root / "README.md", *(p for d in ("src", "tests", "docs", "bench") for p in sorted((root / d).rglob("*"))
                                   if p.is_file() and p.suffix in (".py", ".md", ".sh", ".yaml", ".yml", ".txt"))]
    cited = {}
    for path in files:
        for code in CODE.findall(path.read_text(errors="replace")):
            cited.setdefault(code, str(path.relative_to(root)))
    return cited


def definitions(text: str) -> dict[str, list[str]]:
    """Code -> its definition lines in docs/requirements.md."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = DEFINITION.match(line)
        if match:
            found.setdefault(match.group(1), []).append(match.group(2))
    return found


def missing_tests(definition: str, root: Path = ROOT) -> list[str]:
    """The `file::test` names a definition gives that are no test function in that file."""
    missing = []
    for file, name in TEST.findall(definition):
        path = root / file
        if not path.is_file() or not re.search(rf"^\s*def {name}\(", path.read_text(), re.M):
            missing.append(f"{file}::{name}")
    return missing


def test_every_cited_code_is_defined_once_with_the_tests_that_hold_it():
    defined = definitions((ROOT / "docs" / "requirements.md").read_text())
    undefined = {code: where for code, where in cited_codes().items() if code not in defined}
    assert not undefined, f"cited but not defined in docs/requirements.md (add a line for each): {undefined}"
    twice = [code for code, lines in defined.items() if len(lines) > 1]
    assert not twice, f"defined more than once in docs/requirements.md: {twice}"
    for code, (line,) in defined.items():
        assert "Tests: `tests/" in line or "no test holds it" in line, \
            f"docs/requirements.md {code}: name the tests that hold it (Tests: `tests/file.py::test`), or say no test holds it"
        assert not missing_tests(line), f"docs/requirements.md {code} names tests that do not exist: {missing_tests(line)}"


def test_a_new_code_or_a_renamed_test_is_caught(tmp_path):
    new, old = "R-" + "NEW-1", "R-" + "OLD-1"  # spelled apart, or this file would cite them
    (tmp_path / "tests").mkdir()
    (tmp_path / "README.md").write_text("")
    (tmp_path / "tests" / "test_x.py").write_text(f"def test_kept():\n    pass  # {new}\n")
    assert cited_codes(tmp_path) == {new: "tests/test_x.py"}
    assert list(definitions(f"- **{old}**: something. Tests: `tests/test_x.py::test_kept`.")) == [old]
    line = "something. Tests: `tests/test_x.py::test_kept`, `tests/test_x.py::test_renamed`."
    assert missing_tests(line, tmp_path) == ["tests/test_x.py::test_renamed"]
