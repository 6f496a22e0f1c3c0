"""common.atomic: single-file outputs appear complete or not at all."""

import os

import pytest

from common.atomic import atomic_file, write_text_atomic
from common.errors import UserError


def test_write_replaces_the_target_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    write_text_atomic(str(target), "new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["out.json"]
    write_text_atomic(f"file://{tmp_path}/sub/x.md", "made", make_parent=True)
    assert (tmp_path / "sub" / "x.md").read_text() == "made"


def test_failed_writer_keeps_the_old_file_and_removes_its_temp(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"complete")
    with pytest.raises(RuntimeError):
        with atomic_file(str(target)) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise RuntimeError("writer died")
    assert target.read_bytes() == b"complete" and os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("where, message", [("missing/out.json", "does not exist"), (".", "is a directory"),
                                            ("s3://bucket/out.json", "must be a local path")])
def test_bad_targets_are_one_line_user_errors_naming_the_flag(tmp_path, where, message):
    path = where if "://" in where else str(tmp_path / where)
    with pytest.raises(UserError, match=message) as err:
        write_text_atomic(path, "x", flag="--json")
    assert str(err.value).startswith(f"--json {path}:") and "\n" not in str(err.value)
