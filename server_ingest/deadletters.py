"""`server-ingest dead-letters`: the messages the ingest failed on for a reason of its own.

Each was answered `internal_error`, counted and logged when it came; the ledger keeps the
newest `dead_letters_max` of them (payload cut at `dead_letter_payload_bytes`) for an admin
to inspect or attach to a bug report. Reads the ledger with its own connection; safe while
the ingest runs.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from server_ingest.ledger.choice import open_ledger
from server_ingest.settings import IngestSettings


def dead_letters(settings: IngestSettings, limit: int = 100, as_json: bool = False) -> str:
    if settings.ledger.kind == "sqlite" and not settings.ledger_path.exists():
        return "[]" if as_json else "no ledger yet"
    chosen = open_ledger(settings)  # the shared ledger holds every instance's letters
    try:
        letters = chosen.ledger.dead_letters(limit)
    finally:
        chosen.close()
    rows: list[dict[str, Any]] = [
        {
            "id": d.id,
            "at": datetime.fromtimestamp(d.at, UTC).isoformat(),
            "device": d.device,
            "topic": d.topic,
            "reason": d.reason.value,
            "detail": d.detail,
            "bytes": d.payload_bytes,
            "payload_head": d.payload[:64].hex(),
        }
        for d in letters
    ]
    if as_json:
        return json.dumps(rows, indent=2)
    if not rows:
        return "no dead letters"
    return "\n".join(
        f"{r['id']:>6} {r['at']} {r['device']} {r['topic']} {r['reason']}: {r['detail']} "
        f"({r['bytes']} bytes, starts {r['payload_head'][:32]})"
        for r in rows
    )
