"""docs/reproduction.md is the rendering of configs/authors_recipe.yaml, and every paper-row config resolves to
the values that file states."""
import fnmatch
import os
import sys

import pytest

from cls.config import get_default_config as cls_defaults
from det.config import get_default_config as det_defaults
from mabn.engine.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import paper_tables  # noqa: E402
import reproduction_doc  # noqa: E402

ITEMS = reproduction_doc.load()
EXCLUDED = reproduction_doc.yaml.safe_load(open(reproduction_doc.RECIPE))["exclude_rows"]
DEFAULTS = {"cls": cls_defaults, "det": det_defaults}
RECIPE_ITEMS = ("model", "initialization", "data", "augmentation", "input format", "optimizer", "parameter groups",
                "schedule", "losses", "sampling", "norm settings", "evaluation", "inference statistics")
ROWS = sorted(
    row["config"] for table in paper_tables.load()["tables"].values() for row in table["rows"]
    if row.get("config", "").split("/")[0] in DEFAULTS and not any(fnmatch.fnmatch(row["config"], p) for p in EXCLUDED)
)


def test_the_document_is_the_rendering_of_the_data_file():
    with open(reproduction_doc.DOCUMENT) as f:
        assert f.read() == reproduction_doc.render(ITEMS), "run python scripts/reproduction_doc.py"


@pytest.mark.parametrize("task", sorted(DEFAULTS))
def test_every_recipe_item_has_one_entry_per_task(task):
    assert [e["item"] for e in ITEMS if e["task"] == task] == list(RECIPE_ITEMS)


def test_every_key_pattern_names_paper_rows():
    for entry in ITEMS:
        for spec in entry.get("config", []):
            assert spec["rows"].split("/")[0] == entry["task"], spec
            assert any(fnmatch.fnmatch(row, spec["rows"]) for row in ROWS), f"{spec['rows']} matches no paper row"


_MISSING = object()


def _lookup(cfg, key: str):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


@pytest.mark.parametrize("row", ROWS)
def test_paper_row_resolves_to_the_recipe(row):
    task = row.split("/")[0]
    cfg = load_config(DEFAULTS[task](), os.path.join(ROOT, "configs", row))
    schema = DEFAULTS[task]()
    wrong, not_in_schema = [], []
    for entry in ITEMS:
        for spec in entry.get("config", []):
            if entry["task"] != task or not fnmatch.fnmatch(row, spec["rows"]):
                continue
            value = _lookup(cfg, spec["key"])
            if value is _MISSING and task == "det" and _lookup(schema, spec["key"]) is _MISSING:
                not_in_schema.append(spec["key"])  # only a key the det schema lacks may be left unchecked
            elif value is _MISSING or value != spec["value"]:
                shown = "missing" if value is _MISSING else repr(value)
                wrong.append(f"{spec['key']}: {shown}, the recipe says {spec['value']!r} ({entry['item']})")
    assert not wrong, f"{row}: " + "; ".join(wrong)
    if not_in_schema:
        # the detection recipe keys arrive with the detection branch of issue 11; until then they cannot resolve
        pytest.skip(f"{row}: not in the {task} config schema: {', '.join(not_in_schema)}")
