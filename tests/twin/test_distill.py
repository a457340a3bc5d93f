"""Factors fitted to the experts' outputs: the teacher's targets line up with the student (full rank: KL 0), the
fit lowers the KL from the SVD start, leaves θ* and the given factors alone, and is seeded."""

from __future__ import annotations

import pytest
import torch

from mergesearch.errors import ConfigError
from mergesearch.merging.plan import InputModel, MergePlan
from mergesearch.objectives.scoring import encode_prompt
from mergesearch.twin.distill import DistillSettings, distill_factors, expert_teacher
from mergesearch.twin.factors import compute_factors
from tests.twin.conftest import EXPERTS, make_merger, prompts, shared_plan

SETTINGS = DistillSettings(steps=25, lr=1e-2, batch=24, max_new_tokens=5, top_k=8)


@pytest.fixture(scope="module")
def setup(twin_models):
    """(merger holding θ*, teachers of the three experts on 12 prompts each of their task)."""
    merger = make_merger(twin_models)  # its own: these tests apply the experts' plans
    teachers = []
    for t in EXPERTS:
        plan = MergePlan(merge_method="task_arithmetic", base_model=str(twin_models["base"]), dtype="float32",
                         models=[InputModel(model=str(twin_models[t]), parameters={"weight": 1.0})])
        expert = merger.apply(plan)
        ids = [encode_prompt(merger.tokenizer, p) for p in prompts(t, 12)]
        teachers.append(expert_teacher(expert, merger.tokenizer, ids, SETTINGS))
    merger.apply(shared_plan(twin_models))
    return merger, teachers


def test_teacher_targets_the_continuation(setup):
    _, teachers = setup
    t = teachers[0]
    n, length = t.input_ids.shape
    assert t.top_ids.shape == t.top_logp.shape == (n, length, 8)
    prompt_len = len(t.input_ids[0]) - int((t.attention_mask[0] == 0).sum())  # row 0's real length
    first = int(t.loss_mask[0].nonzero()[0])
    last = int(t.loss_mask[0].nonzero()[-1])
    # prompts of 4 digits: BOS, <task>, 4 digits, "=" -> 7 tokens; its logits at 6 predict the first new token
    assert first == 6 and last == prompt_len - 2
    # the expert's greedy continuation is its own argmax at every target position
    for row in range(n):
        for pos in t.loss_mask[row].nonzero().flatten().tolist():
            assert int(t.top_ids[row, pos, 0]) == int(t.input_ids[row, pos + 1])


def test_full_rank_start_has_zero_kl_and_fit_leaves_it(setup):
    merger, teachers = setup
    exact = compute_factors(merger, 32)  # θ* + B·A is each expert exactly
    _, report = distill_factors(merger.model, exact, teachers, DistillSettings(steps=1, lr=1e-6, batch=8, top_k=8),
                                seed=0)
    assert report.kl_start == pytest.approx(0.0, abs=1e-5)
    assert report.kl_end == pytest.approx(0.0, abs=1e-4)


def test_fit_lowers_kl_from_the_svd_start_and_touches_nothing_else(setup):
    merger, teachers = setup
    start = compute_factors(merger, 1)
    before = {m: (start.A[m].clone(), start.B[m].clone()) for m in start.modules}
    shared = {k: v.clone() for k, v in merger.model.state_dict().items()}
    flags = [p.requires_grad for p in merger.model.parameters()]
    fitted, report = distill_factors(merger.model, start, teachers, SETTINGS, seed=0)
    assert report.kl_end < 0.7 * report.kl_start, report
    assert fitted.modules == start.modules and fitted.rank == 1 and fitted.names == start.names
    for m in start.modules:
        assert fitted.A[m].shape == start.A[m].shape and fitted.B[m].shape == start.B[m].shape
        assert torch.equal(start.A[m], before[m][0]) and torch.equal(start.B[m], before[m][1])
        assert not torch.equal(fitted.A[m], start.A[m])
    for k, v in merger.model.state_dict().items():
        assert torch.equal(v, shared[k]), k
    assert [p.requires_grad for p in merger.model.parameters()] == flags
    assert not merger.model._forward_hooks and all(not m._forward_hooks for m in merger.model.modules())
    again, _ = distill_factors(merger.model, start, teachers, SETTINGS, seed=0)
    assert all(torch.equal(again.A[m], fitted.A[m]) and torch.equal(again.B[m], fitted.B[m]) for m in start.modules)


def test_distillation_refuses_rank_zero_and_missing_teachers(setup):
    merger, teachers = setup
    with pytest.raises(ConfigError, match="rank >= 1"):
        distill_factors(merger.model, compute_factors(merger, 0), teachers)
    with pytest.raises(ConfigError, match="2 teachers for 3 experts"):
        distill_factors(merger.model, compute_factors(merger, 1), teachers[:2])


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kl_is_the_softened_kl_and_zero_on_agreement(temperature):
    from mergesearch.twin.distill import _kl

    gen = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 3, 7, generator=gen), torch.randn(2, 3, 7, generator=gen)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    logp = torch.log_softmax(teacher, -1)
    ids = torch.arange(7).expand(2, 3, 7)  # k = V: the exact (softened) KL
    p_t, q_t = torch.softmax(teacher[mask] / temperature, -1), torch.log_softmax(student[mask] / temperature, -1)
    want = temperature**2 * torch.nn.functional.kl_div(q_t, p_t, reduction="batchmean")
    none = torch.full((2, 3), float("-inf"))
    assert float(_kl(student, ids, logp, none, mask, temperature)) == pytest.approx(float(want), rel=1e-5)
    assert float(_kl(teacher, ids, logp, none, mask, temperature)) == pytest.approx(0.0, abs=1e-6)
    # top-3 of 7 plus "the rest": agreement is still zero, disagreement still positive; a confident teacher's
    # tiny rest must not turn into noise at T > 1
    top_logp, top_ids = logp.topk(3, -1)
    rest = logp.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
    assert float(_kl(teacher, top_ids, top_logp, rest, mask, temperature)) == pytest.approx(0.0, abs=1e-6)
    assert float(_kl(student, top_ids, top_logp, rest, mask, temperature)) > 0.01
    sure = 30 * torch.nn.functional.one_hot(teacher.argmax(-1), 7).float()  # rest mass ~ e^-30
    s_logp = torch.log_softmax(sure, -1)
    s_top, s_ids = s_logp.topk(3, -1)
    s_rest = s_logp.scatter(-1, s_ids, float("-inf")).logsumexp(-1)
    assert float(_kl(sure, s_ids, s_top, s_rest, mask, temperature)) == pytest.approx(0.0, abs=1e-6)
