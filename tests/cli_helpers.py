"""Helpers of the command-line tests: an exit status, and a one-line error checked."""

from fastvq.app.cli import main


def rc(argv) -> int:
    """main()'s exit status with ``--threads 1``, argparse's own exits (SystemExit) included."""
    try:
        return main([*argv, "--threads", "1"] if argv[0] != "--help" else argv)
    except SystemExit as e:
        return e.code


def one_line_error(capsys, *words) -> str:
    """The captured stderr: one line, no traceback, holding every one of ``words``."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    return err
