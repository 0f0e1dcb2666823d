"""docs/faq.md stays true: every question of the websockets server FAQ is answered, in order,
and every code path and test it names exists (CI runs those tests, so they also pass)."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAQ = ROOT / "docs" / "faq.md"

QUESTIONS = [
    "Why does the server close the connection prematurely?",
    "Why does the server close the connection after one message?",
    "Why can only one client connect at a time?",
    "How do I send a message to all users?",
    "How do I send a message to a single user?",
    "How do I send a message to a channel, a topic, or some users?",
    "How do I pass arguments to the connection handler?",
    "How do I access the request path?",
    "How do I access HTTP headers?",
    "How do I set HTTP headers?",
    "How do I get the IP address of the client?",
    "How do I set the IP addresses that my server listens on?",
    "What does `OSError: [Errno 99] error while attempting to bind on address ('::1', 80, 0, 0): address not "
    "available` mean?",
    "How do I close a connection?",
    "How do I stop a server?",
    "How do I stop a server while keeping existing connections open?",
    "How do I implement a health check?",
    "How do I run HTTP and WebSocket servers on the same port?",
]

REFERENCE = re.compile(r"`((?:notifications|project|bin|tests|examples|docs)/[^`\s:]+)(?:::([A-Za-z_][\w.]*))?`")


def sections() -> dict[str, str]:
    text = FAQ.read_text()
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def defined_names(path: Path) -> set[str]:
    """Functions, classes and assigned names at any depth of a Python file ("Class.method" too)."""
    names: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names.update(f"{node.name}.{item.name}" for item in node.body
                             if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef))
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def test_every_question_is_answered_in_order():
    assert list(sections()) == QUESTIONS


@pytest.mark.parametrize("question", QUESTIONS, ids=range(len(QUESTIONS)))
def test_each_answer_links_code_and_names_a_test_that_exist(question):
    body = sections()[question]
    references = REFERENCE.findall(body)
    code = [(p, name) for p, name in references if not p.startswith("tests/")]
    tests = [(p, name) for p, name in references if p.startswith("tests/") and p.endswith(".py")]
    assert code, f"{question!r}: link the code that does it (`notifications/...`)"
    assert any(name.startswith("test_") for _, name in tests), f"{question!r}: name a test (`tests/...py::test_...`)"
    for path, name in references:
        target = ROOT / path
        assert target.exists(), f"{question!r}: {path} does not exist"
        if name:
            if path.endswith(".py"):
                assert name in defined_names(target), f"{question!r}: {path} defines no {name}"
            else:
                assert name in target.read_text(), f"{question!r}: {path} does not mention {name}"


def test_the_readme_links_the_faq():
    assert "docs/faq.md" in (ROOT / "README.md").read_text()
