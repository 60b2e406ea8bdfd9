"""``bench/results.json``: one section per bench (``parallel``, ``step``, ``saga`` ...), read by other tools.

Each bench replaces only its own section, so running one bench never drops another's figures.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results.json"


def write_section(name: str, data: Mapping[str, Any], *, path: Path = RESULTS) -> Path:
    """Set section ``name`` of the results file to ``data``, keeping every other section; returns the path.

    An unreadable file raises rather than being overwritten: it holds other benches' figures. The file is
    replaced atomically, so a reader never sees half of it.
    """
    sections: dict[str, Any] = {}
    if path.exists():
        loaded = json.loads(path.read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a JSON object of sections, got {type(loaded).__name__}")
        sections = loaded
    sections[name] = dict(data)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(sections, indent=2) + "\n")
    os.replace(tmp, path)
    return path
