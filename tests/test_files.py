"""Files are written beside their target and renamed into place: a reader sees the old or the new one, whole."""

import os
import stat

import pytest

from core import files


def test_a_failed_write_leaves_the_old_file_and_no_part(tmp_path):
    target = files.write_text(tmp_path / "out.json", "old")
    with pytest.raises(RuntimeError), files.replacing(target) as part:
        part.write_text("half")
        raise RuntimeError("killed halfway")
    assert target.read_text() == "old" and not (tmp_path / "out.json.part").exists()


def test_a_folder_is_replaced_whole(tmp_path):
    with files.replacing(tmp_path / "model") as part:
        part.mkdir()
        (part / "a").write_text("1")
    with files.replacing(tmp_path / "model") as part:
        part.mkdir()
        (part / "b").write_text("2")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["b"]


def test_a_link_is_written_through_and_stays_a_link(tmp_path):
    real = files.write_text(tmp_path / "real.csv", "old")
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    files.write_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new"


def test_a_pipe_or_a_device_is_written_to_in_place(tmp_path):
    pipe = tmp_path / "pipe"  # as -o /dev/stdout is: nothing to replace, only to write to
    os.mkfifo(pipe)
    reader = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)  # so that opening it for writing does not block
    try:
        files.write_text(pipe, "through")
        assert os.read(reader, 100) == b"through" and stat.S_ISFIFO(os.stat(pipe).st_mode)
    finally:
        os.close(reader)
