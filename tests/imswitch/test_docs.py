"""What docs/imswitch.md shows must be true: its settings load, and they are the defaults."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tilebridge_imswitch.settings import AdapterSettings

DOC = Path(__file__).resolve().parents[2] / "docs" / "imswitch.md"


def test_the_settings_shown_are_every_setting_with_its_default() -> None:
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", DOC.read_text(), re.S)]
    [shown] = [b for b in blocks if "edge_socket" in b]
    settings = AdapterSettings(**shown)
    assert set(shown) == set(AdapterSettings.model_fields)
    assert settings == AdapterSettings()


def test_the_import_lines_switched_are_the_ones_the_doc_names() -> None:
    from tilebridge_imswitch.switch import LINES

    text = DOC.read_text()
    for module in LINES:
        assert f"`{module.name}`" in text
