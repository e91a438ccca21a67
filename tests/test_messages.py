"""What a user reads: progress bars in redirected logs (util/misc.progress) and the calm note that replaces torch's
CUDA_HOME warning on CPU machines."""
import io
import logging

import util.misc as misc


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_into_a_log_is_a_few_lines(monkeypatch):
    """1,000 quick sampling steps written to a file: the first and last report, each on its own line, no redraws."""
    monkeypatch.delenv("JIT_PROGRESS", raising=False)
    log = io.StringIO()
    with misc.progress_bar(total=1000, desc="eval", unit="step", file=log) as bar:
        for _ in range(1000):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert 1 <= len(lines) <= 3, lines
    assert "\r" not in log.getvalue()
    assert lines[-1].startswith("eval: 100%") and "1000/1000" in lines[-1]


def test_progress_on_a_terminal_redraws_live(monkeypatch):
    monkeypatch.delenv("JIT_PROGRESS", raising=False)
    terminal = Terminal()
    with misc.progress_bar(total=50, file=terminal, mininterval=0, miniters=1) as bar:
        for _ in range(50):
            bar.update(1)
    assert terminal.getvalue().count("\r") >= 50  # a redraw per step


def test_progress_live_through_a_pipe_when_asked(monkeypatch):
    """demo.py forwards its stages' output to a terminal: JIT_PROGRESS=live keeps their bars live."""
    monkeypatch.setenv("JIT_PROGRESS", "live")
    pipe = io.StringIO()
    with misc.progress_bar(total=50, file=pipe, mininterval=0, miniters=1) as bar:
        for _ in range(50):
            bar.update(1)
    assert pipe.getvalue().count("\r") >= 50


def test_cuda_home_warning_becomes_one_calm_line(capsys, monkeypatch):
    """The record torch.utils.cpp_extension logs on CPU machines with a CUDA toolkit (torch.compile, bench.py) is
    replaced by one note, once; other warnings of that logger pass."""
    monkeypatch.setattr(misc._CalmCudaHomeWarning, "shown", False)
    logger = logging.getLogger("torch.utils.cpp_extension")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        for _ in range(2):
            logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["something else"]
    err = capsys.readouterr().err
    assert "No CUDA runtime is found" not in err
    assert err.count("note: no CUDA runtime") == 1, err
    assert "no CUDA runtime on this machine, so torch.compile and C++ extensions build CPU code" in err
    assert "/usr/local" in err
