"""cli.py: the one rule for exits on every command line, and the one atomic write."""
import pytest

from cli import Auto, UsageError, atomic_write, parse_exit, parse_exits


def test_one_exit_rule():
    assert parse_exits("15, 18,full") == [15, 18, None]
    assert parse_exits("15,full,auto,auto@0.5,auto@.8", auto=True) == [15, None, Auto(None), Auto(0.5), Auto(0.8)]
    assert parse_exit("full") is None and parse_exit("21") == 21 and parse_exit("auto", auto=True) == Auto(None)
    for bad, auto in [("auto", False), ("auto@0.9", False), ("-1", False), ("x", True), ("auto@", True),
                      ("auto@-1", True), ("", False), (",", True)]:
        with pytest.raises(UsageError, match="exit"):
            parse_exits(bad, auto)
    with pytest.raises(UsageError, match="one exit, not 2"):
        parse_exit("15,18")


def test_atomic_write(tmp_path):
    f = tmp_path / "a.txt"
    atomic_write(f, "one")
    atomic_write(f, lambda p: p.write_text("two"))
    assert f.read_text() == "two" and not list(tmp_path.glob("*.tmp"))

    def crash(p):
        p.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(f, crash)
    assert f.read_text() == "two"  # the old file stands; the next write clears the leftover
    d = tmp_path / "folder"
    for n in (1, 2):  # a folder replaced by a folder, then by a file
        atomic_write(d, lambda p: (p.mkdir(), (p / "x").write_text(str(n))))
        assert (d / "x").read_text() == str(n)
    atomic_write(d, "file")
    assert d.read_text() == "file" and list(tmp_path.glob("*.tmp")) == [tmp_path / "a.txt.tmp"]  # the crash's
