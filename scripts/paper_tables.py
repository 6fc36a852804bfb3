#!/usr/bin/env python
"""The paper's tables (configs/paper_tables.yaml): the config of every row and the figures the paper published.

    python scripts/paper_tables.py configs imagenet_batch             # the table's config names, one a line
    python scripts/paper_tables.py configs coco strategy=finetune     # only the rows whose field has that value
    python scripts/paper_tables.py field coco finetune_mabn_2 backbone   # one field of one row ("" if unset)
    python scripts/paper_tables.py config-map                         # every config and its row, as README.md shows it

A config name is the config's path under configs/cls or configs/det without ".yaml" (``bn_b32``,
``ablation/fwdsma_bwdsma_reduced_renorm``, ``scratch_mabn_2``): the run directory that the launchers create
under their --out and that collect_results.py reads. Loading validates the file (every config exists, every
norm is named, the figures fit their table) and raises PaperTablesError naming the offending row.
"""
from __future__ import annotations

import functools
import os
import sys

import yaml

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
TABLES_FILE = os.path.join(CONFIGS_DIR, "paper_tables.yaml")


class PaperTablesError(ValueError):
    """configs/paper_tables.yaml is inconsistent, or a table or row asked for is not in it."""


def config_name(config: str) -> str:
    """``cls/ablation/x.yaml`` -> ``ablation/x``: the name under the trainer's config folder."""
    return os.path.splitext(config)[0].split("/", 1)[1]


def _where(table: str, index: int, row: dict) -> str:
    return f"{table}, row {index + 1}" + (f" ({row['config']})" if "config" in row else "")


def _check_row(table_name: str, table: dict, index: int, row: dict, norms: dict) -> None:
    where = _where(table_name, index, row)
    if ("paper" in row) == ("stands_in_for" in row):  # a stand-in row takes its figure from the row it names
        raise PaperTablesError(f"{where}: give either paper (null where the paper has no figure) or stands_in_for")
    if "config" in row and not os.path.isfile(os.path.join(CONFIGS_DIR, row["config"])):
        raise PaperTablesError(f"{where}: configs/{row['config']} not found")
    for norm in row.get("norms", [row["norm"]] if "norm" in row else []):
        if norm not in norms:
            raise PaperTablesError(f"{where}: norm {norm!r} is not one of {sorted(norms)}")
    if "metrics" in table and row.get("paper") is not None and len(row["paper"]) != len(table["metrics"]):
        raise PaperTablesError(f"{where}: {len(row['paper'])} paper figures for the {len(table['metrics'])} metrics {table['metrics']}")
    if "switches" in table and set(row.get("switches", {})) != set(table["switches"]):
        raise PaperTablesError(f"{where}: switches {sorted(row.get('switches', {}))}, not the table's {sorted(table['switches'])}")


def _take_paper_figures(where: str, row: dict, by_config: dict) -> None:
    """A stand-in row shows the figure of the row it stands in for (or none), never one of its own."""
    target = row.get("stands_in_for")
    if target is None:
        row.update(paper=None, approximate=False)
        return
    if target not in by_config:
        raise PaperTablesError(f"{where}: stands in for {target}, which is no row of the tables")
    original = by_config[target]
    if (original.get("norm"), original.get("b")) != (row["norm"], row["b"]):
        raise PaperTablesError(f"{where}: {row['norm']} at b = {row['b']} cannot stand in for {target} "
                               f"({original.get('norm')} at b = {original.get('b')})")
    row.update(paper=original["paper"], approximate=original.get("approximate", False))


@functools.lru_cache(maxsize=None)
def load(path: str = TABLES_FILE) -> dict:
    """The validated file, ``{'norms': {norm: label}, 'tables': {name: {..., 'rows': [row, ...]}}}``; every row
    with a config also has its ``name`` (see config_name). Shared between callers: read it, do not change it."""
    with open(path) as f:
        data = yaml.safe_load(f)
    try:
        _complete(data)
    except PaperTablesError as e:
        raise PaperTablesError(f"{path}: {e}") from None
    return data


def _complete(data: dict) -> None:
    """Check every row, give it its name and the stand-in rows their figures."""
    by_config = {}
    for table_name, table in data["tables"].items():
        for index, row in enumerate(table["rows"]):
            _check_row(table_name, table, index, row, data["norms"])
            row.setdefault("approximate", False)
            if "config" in row:
                row["name"] = config_name(row["config"])
                by_config[row["config"]] = row
    for table_name, table in data["tables"].items():
        for index, row in enumerate(table["rows"]):
            if "stands_in_for" in row:
                _take_paper_figures(_where(table_name, index, row), row, by_config)


def table(name: str) -> dict:
    tables = load()["tables"]
    if name not in tables:
        raise PaperTablesError(f"no table {name!r}; the tables are {', '.join(tables)}")
    return tables[name]


def rows(table_name: str, **where) -> list[dict]:
    """The rows of a table in its order, or only those whose fields equal ``where`` (compared as text)."""
    return [row for row in table(table_name)["rows"] if all(str(row.get(k)) == str(v) for k, v in where.items())]


def row(table_name: str, name: str) -> dict:
    for candidate in table(table_name)["rows"]:
        if candidate.get("name") == name:
            return candidate
    raise PaperTablesError(f"table {table_name} has no row {name!r}")


def norm_label(norm: str) -> str:
    """``syncbn`` -> ``SyncBN``: the norm as the tables print it."""
    return load()["norms"][norm]


def paper_by_norm_and_b(table_rows: list[dict]) -> dict:
    """``{norm: {b: figure}}`` of the rows that have a paper figure, e.g. for plot_error_vs_b."""
    figures: dict = {}
    for r in table_rows:
        if r["paper"] is not None:
            figures.setdefault(r["norm"], {})[r["b"]] = r["paper"]
    return figures


def paper_figure(table_name: str, r: dict) -> str:
    """The published figure of a row as the tables print it: ``23.41``, ``~24.30``, ``APb 32.38 / APm 29.07``, ``-``."""
    if r["paper"] is None:
        return "-"
    approximate = "~" if r["approximate"] else ""
    metrics = table(table_name).get("metrics")
    if metrics:
        named = dict(zip(metrics, r["paper"]))
        return " / ".join(f"{metric} {approximate}{named[metric]:.2f}" for metric in ("APb", "APm"))
    return f"{approximate}{r['paper']:.2f}"


def row_label(table_name: str, r: dict) -> str:
    """What makes the row: ``BN, b = 32``; ``MABN, b = 2, without renormalization``; ``2x from scratch, BN, batch 2``."""
    t = table(table_name)
    if "switches" in t:
        off = [t["switches"][switch] for switch, on in r["switches"].items() if not on]
        return f"{norm_label(t['norm'])}, b = {t['b']}, " + (f"off: {', '.join(off)}" if off else "every switch on")
    parts = [t["strategies"][r["strategy"]]] if "strategies" in t else []
    parts.append(norm_label(r["norm"]))
    if "b" in r:
        parts.append(f"b = {r['b']}")
    if "batch" in r:
        parts.append(f"batch {r['batch']}")
    label = ", ".join(parts)
    if r.get("stands_in_for"):
        label += f" (stands in for `{r['stands_in_for']}`)"
    return label


def config_map() -> str:
    """Markdown: for each table of the paper, every config that reproduces one of its rows, the row and its figure."""
    blocks = []
    for table_name, t in load()["tables"].items():
        lines = [f"| `{r['config']}` | {row_label(table_name, r)} | {paper_figure(table_name, r)} |" for r in t["rows"] if "config" in r]
        if lines:  # a table of configs (the inference-speed table has none)
            blocks.append("\n".join([f"| `configs/` | {t['title']} | paper |", "|---|---|---|", *lines]))
    return "\n\n".join(blocks)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) >= 2 and args[0] == "configs" and all("=" in arg for arg in args[2:]):
            filters = dict(arg.split("=", 1) for arg in args[2:])
            print("\n".join(r["name"] for r in rows(args[1], **filters)))
        elif len(args) == 4 and args[0] == "field":
            value = row(args[1], args[2]).get(args[3])
            print("" if value is None else value)
        elif args == ["config-map"]:
            print(config_map())
        else:
            print(__doc__.split("\n\n")[1], file=sys.stderr)
            return 2
    except PaperTablesError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
