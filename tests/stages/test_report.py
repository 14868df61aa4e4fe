"""report.md is shared: score owns the part before the train section, train the section itself."""

from __future__ import annotations

from stages.report import TRAIN_MARKER, write_score_part, write_section


def test_rerunning_score_keeps_the_train_section_and_train_replaces_only_its_own(tmp_path):
    path = tmp_path / "report.md"
    write_score_part(path, "# exp\n\n## Variability\n\nnu v1\n")
    write_section(path, "exp", TRAIN_MARKER, f"{TRAIN_MARKER} (store entry abc)\n\nprobe 0.9\n")
    write_score_part(path, "# exp\n\n## Variability\n\nnu v2\n")
    text = path.read_text()
    assert "nu v2" in text and "nu v1" not in text
    assert text.index("nu v2") < text.index(TRAIN_MARKER) and "probe 0.9" in text
    write_section(path, "exp", TRAIN_MARKER, f"{TRAIN_MARKER} (store entry def)\n\nprobe 0.8\n")
    text = path.read_text()
    assert "nu v2" in text and "probe 0.8" in text and "probe 0.9" not in text and text.count(TRAIN_MARKER) == 1


def test_score_part_alone_when_no_train_ran(tmp_path):
    path = tmp_path / "report.md"
    write_score_part(path, "# exp\n\n## Variability\n")
    assert path.read_text() == "# exp\n\n## Variability\n"
