"""docs/API.md is generated from the protos and covers all of them (issue 15, item 1)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

from google.protobuf.descriptor import Descriptor, EnumDescriptor

from orchestrator_server import apidoc
from orchestrator_server.gateway.app import DEFAULT_SERVICES
from orchestrator_server.gateway.http_rules import build_route_table
from orchestrator_server.gateway.proto_comments import generate_comments

ROOT = Path(__file__).resolve().parents[2]
API_MD = ROOT / "docs" / "API.md"
PROTOS = sorted((ROOT / "proto" / "orchestrator" / "v1").glob("*.proto"))


def fresh() -> str:
    return apidoc.render(generate_comments(ROOT / "proto", PROTOS))


def test_the_committed_document_is_what_the_protos_produce() -> None:
    assert API_MD.read_text() == fresh(), "docs/API.md is stale: run `make proto`"


def _types(message: Descriptor) -> list[Descriptor | EnumDescriptor]:
    if message.GetOptions().map_entry:
        return []
    found: list[Descriptor | EnumDescriptor] = [message, *message.enum_types]
    for nested in message.nested_types:
        found += _types(nested)
    return found


def test_every_service_rpc_message_field_enum_and_route_is_documented() -> None:
    text = API_MD.read_text()
    services = list(DEFAULT_SERVICES)
    for service in services:
        assert f"\n## {service.name}\n" in text
        for rpc in service.methods:
            assert f"\n### {service.name}.{rpc.name}\n" in text
            assert f"`/{service.full_name}/{rpc.name}`" in text
    for proto in PROTOS:
        file = importlib.import_module(f"orchestrator.v1.{proto.stem}_pb2").DESCRIPTOR
        items: list[Descriptor | EnumDescriptor] = list(file.enum_types_by_name.values())
        for message in file.message_types_by_name.values():
            items += _types(message)
        assert items, proto
        for item in items:
            assert f'<a id="{item.full_name.lower().replace(".", "-")}"></a>' in text, item.full_name
            if isinstance(item, EnumDescriptor):
                for value in item.values:
                    assert f"| `{value.name}` | {value.number} |" in text, value.name
            else:
                for field in item.fields:
                    assert f"| `{field.name}` | {field.number} |" in text, field.full_name
    for route in build_route_table(services).routes:
        assert f"`{route.http_method} {route.template.text}`" in text, route.template.text
    # The proto comments are the descriptions.
    assert "Registers an agent. Idempotent on (name, instance_id)" in text


def test_check_mode_fails_on_a_stale_document(tmp_path: Path) -> None:
    stale = tmp_path / "API.md"
    stale.write_text(API_MD.read_text().replace("Registers an agent.", "Registers a robot."))
    command = [sys.executable, "-m", "orchestrator_server.apidoc", "--check", "--output", str(stale)]
    failed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1
    assert "is stale: run 'make proto'" in failed.stderr and "Registers a robot." in failed.stderr
