"""The tables derived from the key declarations, pinned: freshness hashing must not change.

``tests/config/golden_keys.json`` was written from the code before the keys were declared in
one place (issue 18, phase C1): each stage's hashed keys and its config hash for a default
``Config()``, ``RANGES``, the keys never hashed, ``PATH_KEYS`` and ``INVOCATION_KEYS``. A run
folder made before a change stays "up to date" after it only while these stay the same, so a
deliberate change of freshness semantics edits the golden file in the same commit
(``python tests/config/test_config_keys.py --write`` rewrites it from the code).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "config" / "golden_keys.json"


def derived_tables() -> dict[str, Any]:
    """What decides freshness and loading, from the code as it is: JSON-ready, sorted."""
    from common.config.schema import INVOCATION_KEYS, PATH_KEYS, RANGES, Config, all_keys
    from common.config.values import hash_values, is_semantic, key_values
    from common.stages import SPECS

    cfg = Config()
    return {
        "hashed_keys": {name: sorted(key_values(cfg, spec.hashed_keys)) for name, spec in SPECS.items()},
        "config_hash": {name: hash_values(key_values(cfg, spec.hashed_keys)) for name, spec in SPECS.items()},
        "ranges": {k: {"lo": r.lo, "hi": r.hi, "lo_open": r.lo_open, "hi_open": r.hi_open, "why": r.why,
                       "describe": r.describe()} for k, r in sorted(RANGES.items())},
        "never_hashed": sorted(k for k in all_keys() if not is_semantic(k)),
        "path_keys": {k: list(v) for k, v in sorted(PATH_KEYS.items())},
        "invocation_keys": sorted(INVOCATION_KEYS),
    }


def test_declarations_match_golden():
    golden = json.loads(GOLDEN.read_text())
    now = derived_tables()
    assert set(now) == set(golden)
    for table in golden:  # one table at a time: the failure names it
        assert now[table] == golden[table], table


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/config/test_config_keys.py --write  (rewrites tests/config/golden_keys.json)")
    sys.path.insert(0, str(ROOT))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(derived_tables(), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
