"""`python -m tilebridge_imswitch.switch`: the four import lines, switched and back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tilebridge_imswitch.switch import LINES, main, switch


def imswitch_tree(root: Path) -> dict[Path, str]:
    """The four modules with ImSwitch's import line among other lines."""
    texts = {}
    for relative, (theirs, _) in LINES.items():
        text = f'"""{relative.name}"""\nimport os\n{theirs}\n\nfrom x import y\n'
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
        texts[relative] = text
    return texts


def test_switching_changes_the_import_lines_only_and_undo_restores_them(tmp_path: Path) -> None:
    before = imswitch_tree(tmp_path)
    assert all(line.startswith("switched") for line in switch(tmp_path))
    for relative, (theirs, ours) in LINES.items():
        text = (tmp_path / relative).read_text()
        assert theirs not in text.splitlines() and ours in text
        assert text.replace(ours, theirs) == before[relative]
    assert all(line.startswith("already") for line in switch(tmp_path))  # twice: no change
    assert all(line.startswith("switched") for line in switch(tmp_path, undo=True))
    assert {r: (tmp_path / r).read_text() for r in LINES} == before


def test_a_module_that_reads_otherwise_is_named_and_left_alone(tmp_path: Path) -> None:
    imswitch_tree(tmp_path)
    changed = next(iter(LINES))
    (tmp_path / changed).write_text("from imswitch.imcontrol.model.io import OMEWriter\n")
    report = switch(tmp_path)
    assert f"not as expected, left alone: {changed}" in report
    assert main([str(tmp_path)]) == 1  # says so with its exit status


def test_it_runs_as_a_module(tmp_path: Path) -> None:
    imswitch_tree(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "tilebridge_imswitch.switch", str(tmp_path)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("switched:") == 4
