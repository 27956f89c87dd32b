"""Progress of long work: a plain line now and then where the output goes to a log file."""
from slowft import progress as progress_module


def test_a_log_gets_plain_lines(capsys, monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)
    with progress_module.progress(4e9, "import llama", initial=1e9) as bar:  # pytest's stderr is no terminal
        bar.update(1e9)
    assert capsys.readouterr().err == "import llama: 2.00 of 4.00 GB (50%)\n"
    with progress_module.progress(4e9, "export", enabled=False) as bar:
        bar.update(1e9)
    assert capsys.readouterr().err == ""
