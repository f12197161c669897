"""docs/architecture.md names, for every route the app serves and every CLI command, the
file and the function that handle it (once): the tables are checked against the real router and
the real parser, so a route that moves or appears without its row fails here."""

from __future__ import annotations

import argparse
import functools
import os
import re
from pathlib import Path
from typing import Any

from aiohttp import web

from auth.crypto import MasterKey
from gateway.app import create_app
from gateway.cli.main import build_parser
from tests.conftest import REPO
from tests.gateway.conftest import gateway_config

ARCHITECTURE = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
ROW = re.compile(r"^\|(.+)\|\s*$", re.MULTILINE)


def _cells(line: str) -> list[str]:
    """The cells of a table row (``\\|`` is a pipe inside a cell)."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def _code(cell: str) -> str:
    """The first `code` span of a cell."""
    match = re.search(r"`([^`]+)`", cell)
    return match.group(1) if match else ""


def _route_rows() -> dict[tuple[str, str], tuple[str, str, str]]:
    """(method, path) → (route name, file, handler) from the route table."""
    rows = {}
    for line in ROW.findall(ARCHITECTURE):
        cells = _cells(line)
        if len(cells) == 5 and cells[0] in {"GET", "POST", "PUT", "DELETE"}:
            assert (cells[0], _code(cells[1])) not in rows, f"two rows for {cells[:2]}"
            rows[(cells[0], _code(cells[1]))] = (_code(cells[2]), _code(cells[3]), cells[4])
    return rows


def test_every_route_names_the_file_and_function_that_handle_it(tmp_path: Path) -> None:
    app = create_app(gateway_config(tmp_path), master_key=MasterKey(os.urandom(32)))
    rows = _route_rows()
    served = set()
    for route in app.router.routes():
        resource = route.resource
        assert resource is not None
        if route.method == "HEAD":
            continue
        if isinstance(resource, web.StaticResource):
            key = (route.method, f"{resource.canonical}/…")
            assert key in rows, f"docs/architecture.md has no row for {key}"
            directory = Path(resource.get_info()["directory"])
            assert REPO / rows[key][1] == directory, key
            served.add(key)
            continue
        key = (route.method, resource.canonical)
        served.add(key)
        assert key in rows, f"docs/architecture.md has no row for {key}"
        name, file, handler = rows[key]
        assert name == route.name, key
        module = route.handler.__module__
        assert file == module.replace(".", "/") + ".py", (key, module)
        # The handler's own name, or the factory that made it (`_handler(op)`).
        outer = route.handler.__qualname__.split(".")[0]
        assert _code(handler).split("(")[0] == outer, (key, route.handler.__qualname__)
    assert served == set(rows), f"rows for routes the app does not serve: {set(rows) - served}"


def _handler(func: Any) -> Any:
    """The function that does a command's work (``admin`` commands bind it to ``run``)."""
    while isinstance(func, functools.partial):
        func = func.keywords.get("command", func.func)
    return func


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, Any]:
    """Every leaf command of the parser ("admin users create") → its handler."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_commands(sub, f"{prefix}{name} "))
    if not found and prefix:
        found[prefix.strip()] = _handler(parser.get_default("func"))
    return found


def _documented_commands() -> dict[str, tuple[str, set[str]]]:
    """Each command of the CLI table ("admin users create") → its file and the functions
    its row names. A cell such as `admin users create\\|reset` names two; options and
    placeholders are not words."""
    table = {}
    for line in ROW.findall(ARCHITECTURE):
        cells = _cells(line)
        if len(cells) != 3 or not _code(cells[1]).startswith("gateway/cli/"):
            continue
        functions = set(re.findall(r"`([^`]+)`", cells[2]))
        for usage in re.findall(r"`([^`]+)`", cells[0]):
            words = [
                w for w in re.sub(r"\[[^\]]*\]", "", usage).split() if w.islower() and w[0] != "-"
            ]
            for last in words[-1].split("\\|"):
                command = " ".join([*words[:-1], last])
                assert command not in table, f"two rows for `{command}`"
                table[command] = (_code(cells[1]), functions)
    return table


def test_every_command_names_the_file_and_function_that_handle_it() -> None:
    table = _documented_commands()
    commands = _commands(build_parser())
    for command, func in commands.items():
        assert command in table, f"docs/architecture.md has no row for `{command}`"
        file, functions = table[command]
        assert file == func.__module__.replace(".", "/") + ".py", command
        assert func.__name__ in functions, (command, func.__name__)
    assert set(table) == set(commands)
