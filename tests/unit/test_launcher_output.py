"""How `pycoll run --elastic` copies a worker's output file to its own output (pycoll.launcher._Tail):
whole lines, each prefixed, a line written in pieces shown once, the last line without its
newline shown at the end, and a line that never ends shown anyway once it is long."""
import io

from pycoll import launcher


class _Out:
    def __init__(self):
        self.buffer = io.BytesIO()

    def flush(self):
        pass


def test_lines_are_prefixed_whole_and_the_last_one_is_shown_at_the_end(tmp_path):
    path = tmp_path / "w.out"
    path.write_bytes(b"")
    out = _Out()
    tail = launcher._Tail(str(path), b"[2] ", out)
    with open(path, "ab", buffering=0) as f:
        f.write(b"first line\nsec")
        tail.poll()
        assert out.buffer.getvalue() == b"[2] first line\n"
        f.write(b"ond\n\xff raw bytes\nno newline")
        tail.poll()
        assert out.buffer.getvalue() == b"[2] first line\n[2] second\n[2] \xff raw bytes\n"
    tail.poll(final=True)
    assert out.buffer.getvalue().endswith(b"[2] \xff raw bytes\n[2] no newline\n")
    assert tail.f.closed


def test_a_line_that_never_ends_is_shown_once_it_is_long(tmp_path):
    path = tmp_path / "w.out"
    path.write_bytes(b"x" * (launcher._MAX_PARTIAL + 1))
    out = _Out()
    tail = launcher._Tail(str(path), b"[0] ", out)
    tail.poll()
    assert out.buffer.getvalue() == b"[0] " + b"x" * (launcher._MAX_PARTIAL + 1) + b"\n"
    tail.poll(final=True)
    assert out.buffer.getvalue().count(b"\n") == 1


def test_a_text_stream_gets_text(tmp_path):
    path = tmp_path / "w.out"
    path.write_bytes(b"caf\xc3\xa9\n")
    out = io.StringIO()
    launcher._Tail(str(path), b"[1] ", out).poll(final=True)
    assert out.getvalue() == "[1] caf\u00e9\n"
