"""Library errors speak of arguments, the CLI of flags: `errors.refusal` turns a message written with flags into
the library's wording and keeps the flag form for the CLI."""

from __future__ import annotations

import pandas as pd
import pytest
from valuekit.cli.main import main

from valuekit.data.tables import load_table
from valuekit.errors import InputError, refusal


@pytest.mark.parametrize("cli, library", [
    ("t.csv: give the id column with --id-col", "t.csv: give the id column with id_col="),
    ("resize with --image-size H,W", "resize with image_size=H,W"),
    ("t: --image-shape (1, 8, 8) differs (or use --image-size H,W)",
     "t: image_shape=(1, 8, 8) differs (or use image_size=H,W)"),
    ("t: --per-class needs the label column (choose it with --label-col; columns: [])",
     "t: per_class=True needs the label column (choose it with label_col=; columns: [])"),
    ("tokenize it with --tokenizer DIR (--text-col NAME)", "tokenize it with tokenizer=DIR (text_col=NAME)"),
])
def test_refusal_names_arguments_and_keeps_the_flags_for_the_cli(cli, library):
    err = refusal(cli)
    assert str(err) == library and err.cli == cli and "--" not in str(err)


def test_a_list_id_column_is_refused_in_argument_terms_by_the_library_and_flag_terms_by_the_cli(tmp_path, capsys):
    frame = pd.DataFrame({"id": [[0], [1], [2]], "label": ["a", "b", "a"], "f": [1.0, 2.0, 3.0]})
    with pytest.raises(InputError) as info:
        load_table(frame)
    assert "id_col=" in str(info.value) and "--id-col" not in str(info.value)
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    code = main(["train", str(tmp_path / "t.parquet"), "--dev", str(tmp_path / "t.parquet"), "--out",
                 str(tmp_path / "r"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--id-col" in err and err.count("\n") == 1 and not (tmp_path / "r").exists()
