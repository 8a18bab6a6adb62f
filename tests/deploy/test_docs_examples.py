"""Configuration shown in the docs must load: the settings models refuse unknown keys."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from server_ingest.settings import IngestSettings

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _json_blocks(doc: str) -> list[dict[str, Any]]:
    text = (DOCS / doc).read_text()
    return [json.loads(b) for b in re.findall(r"```json\n(.*?)```", text, flags=re.S)]


def test_the_omero_configuration_in_the_docs_loads(tmp_path: Path) -> None:
    one_server, several = _json_blocks("omero.md")
    settings = IngestSettings(data_dir=tmp_path, **one_server)
    assert settings.backends == ("archive", "omero")
    assert settings.omero is not None
    assert settings.omero.devices["scope-1"].projects == ("Lab A *",)
    settings = IngestSettings(data_dir=tmp_path, **several)
    assert set(settings.omero_targets) == {"facility", "lab-b"}
    assert [r.target for r in settings.routes] == ["lab-b", "lab-b", "facility"]
