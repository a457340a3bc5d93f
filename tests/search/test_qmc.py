"""KeptSobolSampler: Optuna's QMCSampler point for point — one trial at a time, several running, a resumed study
with a new sampler, and one sampler over two studies in turn."""

from __future__ import annotations

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from mergesearch.search.optimizers.qmc import KeptSobolSampler

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {
    "w": FloatDistribution(0.0, 1.0),
    "l": FloatDistribution(1e-3, 1.0, log=True),
    "k": IntDistribution(1, 9),
    "m": CategoricalDistribution(["ties", "dare", "linear"]),
}


def _sampler(kind: type, **kw) -> optuna.samplers.QMCSampler:  # type: ignore[type-arg]
    return kind(qmc_type="sobol", scramble=True, seed=5, warn_independent_sampling=False, **kw)


def _run(study: optuna.Study, rounds: int, parallel: int) -> list[dict]:
    out = []
    for _ in range(rounds):
        asked = [study.ask(SPACE) for _ in range(parallel)]
        for t in asked:
            out.append(dict(t.params))
            study.tell(t, [t.params["w"], t.params["k"]])
    return out


def _study(sampler: optuna.samplers.BaseSampler, storage: optuna.storages.BaseStorage | None = None,
           name: str | None = None) -> optuna.Study:
    return optuna.create_study(directions=["minimize", "maximize"], sampler=sampler, storage=storage,
                               study_name=name, load_if_exists=True)


def test_points_are_optunas_one_at_a_time_and_several_running() -> None:
    for parallel in (1, 4):
        ours = _run(_study(_sampler(KeptSobolSampler)), 24 // parallel, parallel)
        theirs = _run(_study(_sampler(optuna.samplers.QMCSampler)), 24 // parallel, parallel)
        assert ours == theirs
        assert len({p["w"] for p in ours}) == len(ours)


def test_the_engine_is_kept_between_trials() -> None:
    sampler = _sampler(KeptSobolSampler)
    study = _study(sampler)
    _run(study, 2, 1)  # the first trial is sampled at random (no search space yet), the second builds the engine
    engine = sampler._engine
    _run(study, 8, 1)
    assert engine is not None and sampler._engine is engine


def test_resume_with_a_new_sampler_and_two_studies_in_turn() -> None:
    storage = optuna.storages.InMemoryStorage()
    ours = _run(_study(_sampler(KeptSobolSampler), storage, "a"), 10, 1)
    ours += _run(_study(_sampler(KeptSobolSampler), storage, "a"), 10, 1)  # resumed: the engine starts at 10
    theirs = _run(_study(_sampler(optuna.samplers.QMCSampler)), 20, 1)
    assert ours == theirs

    def in_turn(kind: type) -> list[dict]:  # one sampler, two studies, a trial each in turn
        shared = _sampler(kind)
        a, b = _study(shared), _study(shared)
        return [_run(s, 1, 1)[0] for _ in range(6) for s in (a, b)]

    ours, theirs = in_turn(KeptSobolSampler), in_turn(optuna.samplers.QMCSampler)
    assert ours == theirs
    assert ours[4:12:2] == ours[5:12:2]  # the same sequence in both studies, after the random first trials
