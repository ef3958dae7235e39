"""cnnserve.v1 stays backward compatible: every message field (name, number, type, repeated or not),
enum value and RPC (types, streaming) published so far is still there, unchanged. New fields and
RPCs are free to come; data/cnnserve_v1_published.json is the record of what was published, and
adding to it is how a release publishes more (regenerate with
`python tests/unit/service/test_proto_compatible.py`; never remove or edit an entry).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service._proto.cnnserve.v1 import inference_pb2 as pb

PUBLISHED = Path(__file__).parent / "data" / "cnnserve_v1_published.json"


def describe() -> dict[str, Any]:
    """The API's shape as the record keeps it."""
    out: dict[str, Any] = {"messages": {}, "enums": {}, "rpcs": {}}

    def walk(message: Any, prefix: str = "") -> None:
        name = prefix + message.name
        out["messages"][name] = {
            f.name: [
                f.number,
                f.type,
                f.is_repeated,
                (f.message_type or f.enum_type).full_name if (f.message_type or f.enum_type) else "",
            ]
            for f in message.fields
        }
        for nested in message.nested_types:
            if not nested.GetOptions().map_entry:
                walk(nested, name + ".")
        for enum in message.enum_types:
            out["enums"][f"{name}.{enum.name}"] = {v.name: v.number for v in enum.values}

    for message in pb.DESCRIPTOR.message_types_by_name.values():
        walk(message)
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        out["enums"][enum.name] = {v.name: v.number for v in enum.values}
    for service in pb.DESCRIPTOR.services_by_name.values():
        for m in service.methods:
            out["rpcs"][f"{service.name}/{m.name}"] = [
                m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming
            ]  # fmt: skip
    return out


CURRENT = describe()
RECORD = (
    json.loads(PUBLISHED.read_text()) if PUBLISHED.exists() else {"messages": {}, "enums": {}, "rpcs": {}}
)


@pytest.mark.parametrize("message", sorted(RECORD["messages"]))
def test_published_fields_are_unchanged(message: str) -> None:
    assert message in CURRENT["messages"], f"message {message} was removed or renamed"
    now = CURRENT["messages"][message]
    for field, published in RECORD["messages"][message].items():
        assert now.get(field) == published, f"{message}.{field}: published {published}, now {now.get(field)}"
    numbers = [entry[0] for entry in now.values()]
    assert len(numbers) == len(set(numbers))


@pytest.mark.parametrize("enum", sorted(RECORD["enums"]))
def test_published_enum_values_are_unchanged(enum: str) -> None:
    now = CURRENT["enums"].get(enum, {})
    assert {k: now.get(k) for k in RECORD["enums"][enum]} == RECORD["enums"][enum]


def test_published_rpcs_are_unchanged() -> None:
    for rpc, published in RECORD["rpcs"].items():
        assert CURRENT["rpcs"].get(rpc) == published, rpc


def test_the_record_is_complete() -> None:
    """What the proto has, the record has: a new field is published by regenerating it."""
    assert set(CURRENT["rpcs"]) == set(RECORD["rpcs"])
    assert {m: set(f) for m, f in CURRENT["messages"].items()} == {
        m: set(f) for m, f in RECORD["messages"].items()
    }


if __name__ == "__main__":
    record = (
        json.loads(PUBLISHED.read_text()) if PUBLISHED.exists() else {"messages": {}, "enums": {}, "rpcs": {}}
    )
    for section, entries in CURRENT.items():
        for key, value in entries.items():
            if isinstance(value, dict):
                record[section].setdefault(key, {}).update(
                    {k: v for k, v in value.items() if k not in record[section].get(key, {})}
                )
            else:
                record[section].setdefault(key, value)
    PUBLISHED.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
