"""trials.csv is rewritten as trials end, spaced so that rewriting it takes a bounded share of
the driver's time however large the study grows, and the study's end always writes it."""

import pandas as pd

from lfm_ray.study import run as study_run


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def monotonic(self):
        return self.now


class FakeRows:
    """Rows whose table takes `cost` seconds of the fake clock to build and write."""

    def __init__(self, clock, cost):
        self.clock, self.cost = clock, cost

    def rows(self, trials, experiment, cut):
        self.clock.now += self.cost
        return pd.DataFrame({"trial_id": [str(t) for t in trials]})


def watch_with(monkeypatch, cost):
    clock = FakeClock()
    written = []
    monkeypatch.setattr(study_run, "time", clock)
    monkeypatch.setattr(study_run, "write_tables", lambda study, table: written.append(len(table)))
    watch = study_run.TrialWatch(study=None, experiment="tune", rows=FakeRows(clock, cost))
    return watch, clock, written


def test_a_cheap_table_is_rewritten_after_every_trial(monkeypatch):
    watch, clock, written = watch_with(monkeypatch, cost=0.002)
    for n in range(1, 11):
        clock.now += 0.5  # a trial ends every half second
        watch.write(list(range(n)))
    assert written == list(range(1, 11))


def test_a_costly_table_is_rewritten_at_most_a_twentieth_of_the_time(monkeypatch):
    watch, clock, written = watch_with(monkeypatch, cost=0.3)
    start = clock.now
    for n in range(1, 2001):
        clock.now += 0.1  # trials end faster than the table is written
        watch.write(list(range(n)))
    spent = 0.3 * len(written)
    assert spent / (clock.now - start) <= 1 / study_run.WRITE_SPACING
    # spaced, never stopped: a rewrite every 6.3 s of the clock holds nearly every trial
    assert written[0] == 1 and len(written) >= 30 and written[-1] >= 2000 - 70

