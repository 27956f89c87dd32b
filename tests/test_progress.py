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


def test_a_long_step_says_where_it_is(monkeypatch):
    """Phase, unit k of n, micro-batch j of K and the step's ETA from the share of work done:
    redrawn in place on a terminal, a line each time in a log."""
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    for stream, sep in ((Terminal(), "\r"), (io.StringIO(), "\n")):
        p = progress_module.StepProgress(n_layers=2, stream=stream)
        p.begin(7)
        p("forward", 1, 3, 1, 2)  # the embedding's and the first block's work of 2 micro-batches
        p("backward", 0, 4, 0, 2)  # the forward done: 6 of 30 units of work
        p.clear()
        text = stream.getvalue()
        assert "step 7: forward unit 2/3, micro-batch 2/2, 10%, step ETA 1m30s" in text
        assert "step 7: backward unit 1/4, micro-batch 1/2, 20%, step ETA 1m20s" in text
        assert text.count(sep) >= 2


def test_a_run_on_a_terminal_has_one_bar():
    """On a terminal the run is one bar (steps, ETA, the last step's loss, tokens/s, SSD written)
    that also shows where the step in hand is; in a log file there is no bar at all."""
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    bar = progress_module.RunBar(total=10, initial=4, stream=term)
    inside = progress_module.StepProgress(n_layers=2, stream=term, bar=bar)
    inside.last = -1e9  # (not throttled)
    inside.begin(5)
    inside("backward", 1, 4, 0, 2)
    bar.step("loss 1.2345, 99 tok/s, SSD written 1.00 GB")
    bar.close()
    text = term.getvalue()
    assert "5/10" in text and "loss 1.2345, 99 tok/s, SSD written 1.00 GB" in text and "step 5: backward unit 2/4" in text
    log = io.StringIO()
    assert not progress_module.RunBar(total=10, initial=0, stream=log).active and log.getvalue() == ""
