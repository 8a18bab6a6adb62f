"""docs/status.md is the contract of the retained status topics: it must match the models and
the messages a real scan puts on the broker.

Run as a module with `--write` to regenerate the doc's JSON blocks from the models.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from pydantic import BaseModel

from devtools.stack import wait_for
from edge_agent.simulate import SyntheticScan
from tests.dashboard.stack import DEVICE, StatusCollector, running_stack, scan
from tilebridge_protocol.status import DeviceStatus, ImageStatus, IngestStatus
from tilebridge_protocol.topics import (
    DeviceTopic,
    device_topic,
    image_status_topic,
    ingest_status_topic,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "status.md"
MODELS: dict[str, type[BaseModel]] = {
    "tilebridge/v1/dev/<device>/status": DeviceStatus,
    "tilebridge/v1/ingest/<instance>/status": IngestStatus,
    "tilebridge/v1/image/<device>/<image_id>/status": ImageStatus,
}
_SECTION = re.compile(r"^## [^\n]*`(tilebridge/v1/[^`]+)`[^\n]*$", re.MULTILINE)
_JSON_BLOCK = re.compile(r"```json\n(.*?)```", re.DOTALL)


def doc_sections(text: str) -> dict[str, tuple[str, re.Match[str]]]:
    """Topic pattern -> (the section's prose, its first ```json block)."""
    heads = list(_SECTION.finditer(text))
    sections = {}
    for n, head in enumerate(heads):
        end = heads[n + 1].start() if n + 1 < len(heads) else len(text)
        block = _JSON_BLOCK.search(text, head.end(), end)
        assert block is not None, f"no ```json block under {head.group(0)!r}"
        sections[head.group(1)] = (text[head.end() : block.start()], block)
    return sections


def doc_schemas() -> dict[str, dict[str, Any]]:
    return {t: json.loads(b.group(1)) for t, (_, b) in doc_sections(DOC.read_text()).items()}


def topic_regex(pattern: str) -> re.Pattern[str]:
    # `<name>` stands for one topic level; re.escape leaves `<`, `>` and `_` alone.
    return re.compile("^" + re.sub(r"<[a-z_]+>", "[^/]+", re.escape(pattern)) + "$")


def property_names(schema: dict[str, Any]) -> set[str]:
    names = set(schema.get("properties", {}))
    for sub in schema.get("$defs", {}).values():
        names |= set(sub.get("properties", {}))
    return names


def test_doc_covers_every_status_topic_with_the_models_schema() -> None:
    schemas = doc_schemas()
    assert set(schemas) == set(MODELS), "docs/status.md must have one section per status topic"
    for topic, model in MODELS.items():
        assert schemas[topic] == model.model_json_schema(), (
            f"the schema of {topic} in docs/status.md is out of date: run "
            "`PYTHONPATH=. .venv/bin/python -m tests.dashboard.test_status_schema --write`"
        )


def test_doc_patterns_are_the_topics_the_code_builds() -> None:
    image_id = UUID(int=7)
    built = {
        device_topic("scope-1", DeviceTopic.STATUS),
        ingest_status_topic("ingest-1"),
        image_status_topic("scope-1", image_id),
    }
    for topic in built:
        assert sum(bool(topic_regex(p).match(topic)) for p in MODELS) == 1, topic


def test_doc_describes_every_field() -> None:
    for topic, (prose, _) in doc_sections(DOC.read_text()).items():
        missing = {
            n for n in property_names(MODELS[topic].model_json_schema()) if f"`{n}`" not in prose
        }
        missing -= {"v", "at"}  # described once for all topics at the top of the page
        assert not missing, f"docs/status.md does not describe {sorted(missing)} of {topic}"


def test_live_status_messages_of_a_real_scan_validate_against_the_doc(tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validators = {
        topic_regex(pattern): jsonschema.Draft202012Validator(schema)
        for pattern, schema in doc_schemas().items()
    }
    for validator in validators.values():
        jsonschema.Draft202012Validator.check_schema(validator.schema)

    with running_stack(tmp_path) as stack, StatusCollector(stack.broker.port) as collector:
        image_id = scan(stack.agent, SyntheticScan(columns=3, rows=2, tile_size=256, seed=3))
        assert stack.agent.acquisition.wait_done(image_id, 60).server == "complete"
        image_topic = image_status_topic(DEVICE, image_id)
        wait_for(
            lambda: any(
                m.topic == image_topic and json.loads(m.payload)["phase"] == "complete"
                for m in collector.received()
            ),
            30,
            "the image's complete status",
        )
        stack.agent.stop()  # publishes the device's final, offline status
        device = device_topic(DEVICE, DeviceTopic.STATUS)
        wait_for(
            lambda: any(
                m.topic == device and json.loads(m.payload)["state"] == "offline"
                for m in collector.received()
            ),
            30,
            "the device's offline status",
        )
        messages = collector.received()

    kinds: dict[str, int] = {}
    for message in messages:
        matching = [v for rx, v in validators.items() if rx.match(message.topic)]
        assert len(matching) == 1, f"{message.topic} matches {len(matching)} documented topics"
        errors = list(matching[0].iter_errors(json.loads(message.payload)))
        assert not errors, f"{message.topic}: {[e.message for e in errors]}"
        kinds[matching[0].schema["title"]] = kinds.get(matching[0].schema["title"], 0) + 1
    assert set(kinds) == {"DeviceStatus", "IngestStatus", "ImageStatus"}, kinds

    phases = [json.loads(m.payload)["phase"] for m in messages if m.topic == image_topic]
    assert "receiving" in phases and phases[-1] == "complete", phases
    # As documented: a finished image's status expires from the broker; a running one does not.
    final = [m for m in messages if m.topic == image_topic][-1]
    assert final.expiry_s is not None and final.expiry_s > 0
    running = [m for m in messages if m.topic == image_topic and b'"receiving"' in m.payload]
    assert all(m.expiry_s is None for m in running)


def write() -> None:
    """Replace each section's JSON block in docs/status.md with its model's current schema."""
    text = DOC.read_text()
    sections = doc_sections(text)
    for topic, (_, block) in sorted(sections.items(), key=lambda s: -s[1][1].start()):
        schema = json.dumps(MODELS[topic].model_json_schema(), indent=2)
        text = text[: block.start(1)] + schema + "\n" + text[block.end(1) :]
    DOC.write_text(text)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.dashboard.test_status_schema --write")
    write()
