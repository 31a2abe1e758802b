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



class FakeTrial:
    def __init__(self, trial_id, status="PENDING"):
        self.trial_id, self.status = trial_id, status


def test_trials_in_flight_at_each_step_match_a_scan_of_all_trials():
    import random

    from lfm_ray.study.tables import FINAL_STATUSES

    rng = random.Random(0)
    watch = study_run.TrialWatch(study=None, experiment="tune")
    trials = []
    for step in range(300):
        trials += [FakeTrial(f"t{len(trials) + i}") for i in range(rng.randint(0, 3))]
        for t in trials:
            if str(t.status) not in FINAL_STATUSES and rng.random() < 0.2:
                t.status = rng.choice(["RUNNING", "TERMINATED", "ERROR", "PAUSED"])
        watch.step_end(trials)
        assert watch.in_flight == {t.trial_id for t in trials
                                   if str(t.status) not in FINAL_STATUSES}
    assert 0 < len(watch.in_flight) < len(trials)
    # A different (shorter) list, as a restored experiment's: looked at whole again.
    watch.step_end(trials[:5])
    assert watch.in_flight == {t.trial_id for t in trials[:5]
                               if str(t.status) not in FINAL_STATUSES}


def test_tunes_experiment_state_is_saved_less_often_as_the_study_grows():
    assert study_run.state_save_period(2) == 1.0  # a small study: every second
    assert study_run.state_save_period(100) == 1.0
    assert study_run.state_save_period(1_000) == 10.0
    assert study_run.state_save_period(10_000) == 100.0


def test_the_save_period_is_set_while_an_experiment_runs_and_a_users_own_wins(monkeypatch):
    import os

    key = "TUNE_GLOBAL_CHECKPOINT_S"
    monkeypatch.delenv(key, raising=False)
    with study_run.experiment_state_period(5_000):
        assert os.environ[key] == "50"
    assert key not in os.environ  # no later experiment inherits it
    monkeypatch.setenv(key, "7")
    with study_run.experiment_state_period(5_000):
        assert os.environ[key] == "7"
    assert os.environ[key] == "7"
