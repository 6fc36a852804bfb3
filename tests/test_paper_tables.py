"""scripts/paper_tables.py: a broken configs/paper_tables.yaml is refused with an error naming the row."""
import os
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import paper_tables  # noqa: E402


def _load_changed(tmp_path, change):
    with open(paper_tables.TABLES_FILE) as f:
        data = yaml.safe_load(f)
    change(data["tables"])
    path = tmp_path / "paper_tables.yaml"
    path.write_text(yaml.safe_dump(data))
    return paper_tables.load(str(path))


def _set(table, index, **fields):
    return lambda tables: tables[table]["rows"][index].update(fields)


@pytest.mark.parametrize("change,message", [
    (_set("imagenet_batch", 2, config="cls/bn_b7.yaml"), "imagenet_batch, row 3 (cls/bn_b7.yaml): configs/cls/bn_b7.yaml not found"),
    (_set("coco", 0, norm="xn"), "coco, row 1 (det/scratch_bn_2.yaml): norm 'xn' is not one of"),
    (_set("coco", 1, paper=[34.07]), "coco, row 2 (det/scratch_brn_2.yaml): 1 paper figures for the 6 metrics"),
    (_set("fashion_mnist", 1, stands_in_for="cls/bn_b4.yaml"), "fashion_mnist, row 2 (cls/fashion_mnist/bn_b2.yaml): bn at b = 2 cannot stand in for cls/bn_b4.yaml"),
    (_set("fashion_mnist", 0, paper=23.41), "fashion_mnist, row 1 (cls/fashion_mnist/bn_b32.yaml): give either paper"),
    (_set("imagenet_ablation", 0, switches={"renorm": True}), "imagenet_ablation, row 1 (cls/ablation/fwdsma_bwdsma_reduced_renorm.yaml): switches"),
])
def test_a_broken_row_is_refused_by_name(tmp_path, change, message):
    with pytest.raises(paper_tables.PaperTablesError) as error:
        _load_changed(tmp_path, change)
    assert str(error.value).startswith(str(tmp_path)) and message in str(error.value)


def test_stand_in_rows_show_the_figure_of_the_row_they_stand_in_for():
    fashion = {r["name"]: r for r in paper_tables.rows("fashion_mnist")}
    assert (fashion["fashion_mnist/mabn_b1"]["paper"], fashion["fashion_mnist/mabn_b1"]["approximate"]) == (23.7, True)
    assert fashion["fashion_mnist/bn_b1"]["paper"] is None


def test_command_line_lists_a_table_or_one_field(capsys):
    assert paper_tables.main(["configs", "coco", "strategy=finetune"]) == 0
    assert capsys.readouterr().out.split() == ["finetune_syncbn_2x8", "finetune_mabn_2"]
    assert paper_tables.main(["field", "coco", "finetune_mabn_2", "backbone"]) == 0
    assert capsys.readouterr().out == "--imagenet-mabn\n"
    assert paper_tables.main(["configs", "nowhere"]) == 1 and "no table 'nowhere'" in capsys.readouterr().err


def test_the_readme_shows_the_config_map_of_the_tables_file():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    begin, end = "<!-- config map: begin -->\n", "\n<!-- config map: end -->"
    assert readme[readme.index(begin) + len(begin):readme.index(end)] == paper_tables.config_map(), \
        "README.md's config map is stale: paste the output of `python scripts/paper_tables.py config-map`"
    assert "| `cls/mabn_b2.yaml` | MABN, b = 2 | 23.67 |" in readme
    assert "| `cls/ablation/fwdsma_bwdsma_reduced_norenorm.yaml` | MABN, b = 2, off: renormalization | - |" in readme
    assert "| `det/finetune_mabn_2.yaml` | 2x fine-tune, MABN, batch 2 | APb 38.42 / APm 34.12 |" in readme
