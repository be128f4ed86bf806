"""The README's error tables and the gateway's code name the same (status, code) pairs, and every error the gateway
raises names its code."""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

from lora_router.routing import FallbackReason
from serving.gateway.app import HTTP_ERROR_CODES
from serving.gateway.upstream import RELAYED_CODES

ROOT = Path(__file__).resolve().parents[1]
GATEWAY = ROOT / "serving" / "gateway"


def raised_in_code() -> tuple[set[tuple[int, str]], list[str]]:
    """Every (status, code) the gateway's modules raise, and the GatewayError calls that name no code."""
    pairs, uncoded = set(), []
    for path in sorted(GATEWAY.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "GatewayError"):
                continue
            code = next((k.value for k in node.keywords if k.arg == "code"), None)
            if code is None:
                uncoded.append(f"{path.name}:{node.lineno}")
            elif isinstance(node.args[0], ast.Constant) and isinstance(code, ast.Constant):
                pairs.add((node.args[0].value, code.value))
    # Codes chosen at run time: vLLM's answers relayed, aiohttp's own refusals, a route refused by its reason.
    pairs |= set(RELAYED_CODES.items()) | {(404, "model_not_found"), (502, "upstream_failed")}
    pairs |= set(HTTP_ERROR_CODES.items()) | {(422, reason) for reason in typing.get_args(FallbackReason)}
    return pairs, uncoded


def documented() -> set[tuple[int, str]]:
    """Every (status, code) of the README's error tables (rows `| status | when | codes |`)."""
    pairs = set()
    for status, codes in re.findall(r"^\| (\d{3}) \| .* \| ((?:`\w+`(?:, )?)+) \|$", (ROOT / "README.md").read_text(),
                                    re.MULTILINE):
        pairs |= {(int(status), code) for code in re.findall(r"`(\w+)`", codes)}
    return pairs


def test_every_gateway_error_names_a_code():
    assert raised_in_code()[1] == []


def test_the_readme_error_tables_match_the_code():
    code, readme = raised_in_code()[0], documented()
    assert not code - readme, f"raised but not in the README's tables: {sorted(code - readme)}"
    assert not readme - code, f"in the README's tables but never raised: {sorted(readme - code)}"
