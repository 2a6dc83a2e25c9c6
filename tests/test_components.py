"""The trainer's components in-process: teacher weights (live, snapshot, EMA), the loss modes'
own decisions (SDPO's privileged context and normalisation, OPSD's reference-solution context),
the leakage detector, fault injection."""

import math
from types import SimpleNamespace

import pytest
import torch

from megatron_rlsd.algorithms import MicroBatch, make_loss_mode
from megatron_rlsd.algorithms.losses import sdpo_token_divergence, teacher_topk
from megatron_rlsd.config import AlgorithmConfig, FaultInjectionConfig
from megatron_rlsd.data import PromptRow, PromptTemplates
from megatron_rlsd.fault_injection import FaultInjector
from megatron_rlsd.leakage import LeakageDetector
from megatron_rlsd.rollout.samples import Sample
from megatron_rlsd.teacher import TeacherWeights


def toy(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()


def test_ema_teacher_equals_its_closed_form():
    """teacher_n = (1 - r)^n teacher_0 + r * sum_k (1 - r)^(n - k) policy_k after n updates."""
    model, r, n = toy(), 0.05, 7
    teacher = TeacherWeights(model, refresh_interval=10, ema_rate=r)
    t0 = [p.detach().clone() for p in model.parameters()]
    policies = []
    for step in range(1, n + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))  # an optimizer step
        policies.append([p.detach().clone() for p in model.parameters()])
        teacher.after_update(step)
    for i, t in enumerate(teacher.weights):
        closed = (1 - r) ** n * t0[i] + r * sum((1 - r) ** (n - k) * policies[k - 1][i] for k in range(1, n + 1))
        torch.testing.assert_close(t, closed, rtol=0, atol=1e-12)
    assert teacher.age == n  # EMA never "refreshes"


def test_snapshot_teacher_refreshes_every_k_and_swaps_in_place():
    model = toy()
    teacher = TeacherWeights(model, refresh_interval=3)
    params = list(model.parameters())
    snapshot = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    policy = [p.detach().clone() for p in params]
    x = torch.randn(5, 3, dtype=torch.float64)
    with teacher.swapped_in():  # the same modules compute with the teacher's weights
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), snapshot))
        assert list(model.parameters())[0] is params[0]  # no second model: the same Parameter objects
        out_teacher = model(x)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), policy))
    assert not torch.equal(out_teacher, model(x))
    for step in (1, 2):
        teacher.after_update(step)
        assert teacher.age == step and not torch.equal(teacher.weights[0], params[0])
    teacher.after_update(3)
    assert teacher.age == 0 and all(torch.equal(t, p) for t, p in zip(teacher.weights, params))
    live = TeacherWeights(model, refresh_interval=1)
    assert live.is_live and live.weights is None
    with live.swapped_in():
        assert torch.equal(model(x), model(x))


def _sample(row, group, correct, response, text):
    return Sample(row=row, group=group, student_prompt=[1, 2], teacher_prompt=[9], response=response, text=text, correct=correct)


def test_sdpo_reprompts_with_the_student_prompt_and_normalises_by_its_own_tokens():
    """SDPO's teacher sees the student's prompt (format instructions included) plus the shortest
    other correct response; samples without a correct sibling are out of the loss and of its
    denominator."""
    mode = make_loss_mode(AlgorithmConfig(loss_mode="sdpo", distill_topk=4))
    templates = PromptTemplates()
    rows = [PromptRow(id="a", problem="What is 1 + 2?", answer="3"), PromptRow(id="b", problem="What is 2 + 2?", answer="4")]
    samples = [
        _sample(rows[0], 0, True, [5] * 6, "<answer>3</answer> long"),
        _sample(rows[0], 0, True, [5] * 4, "<answer>3</answer>"),
        _sample(rows[0], 0, False, [5] * 3, "<answer>5</answer>"),
        _sample(rows[1], 1, False, [5] * 5, "no"),
        _sample(rows[1], 1, False, [5] * 7, "no"),
    ]
    seen = []

    def encode(messages, images):
        seen.append(messages[0]["content"])
        return [len(seen)], None

    mode.teacher_prompts(samples, templates, encode)
    assert [s.teacher_valid for s in samples] == [True, True, True, False, False]
    student_text = templates.student_text(rows[0])
    assert seen[0] == f"{student_text}\n\nCorrect solution:\n\n<answer>3</answer>\n\nCorrectly solve the original question."
    assert "<answer> </answer> tags" in seen[0]  # the student's format instruction reaches the teacher
    assert seen[1].endswith("<answer>3</answer> long\n\nCorrectly solve the original question.")  # never itself
    assert mode.denominator(samples) == 6 + 4 + 3  # tokens of the valid samples only

    # the loss of a micro-batch: the masked-in tokens' divergence summed, over that denominator
    gen = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(5, 7, 16, generator=gen, requires_grad=True), torch.randn(5, 7, 16, generator=gen)
    lengths = torch.tensor([len(s.response) for s in samples])
    valid = torch.tensor([s.teacher_valid for s in samples])
    mask = (torch.arange(7) < lengths[:, None]) & valid[:, None]
    zeros = torch.zeros(5, 7)
    top = teacher_topk(teacher, 4)  # what the teacher pass keeps: 4 log-probs + a tail per token
    loss, _ = mode.loss(MicroBatch(logits, zeros, mask, zeros, zeros, None, None, top, mode.denominator(samples), None, 1.0))
    div = sdpo_token_divergence(logits, teacher, topk=4)
    assert math.isclose(loss.item(), div[mask].sum().item() / 13, rel_tol=1e-6)
    full, _ = make_loss_mode(AlgorithmConfig(loss_mode="sdpo", distill_topk=0)).loss(
        MicroBatch(logits, zeros, mask, zeros, zeros, None, teacher, None, 13.0, None, 1.0))  # the whole vocabulary
    assert math.isclose(full.item(), sdpo_token_divergence(logits, teacher, topk=16)[mask].sum().item() / 13, rel_tol=1e-6)


def test_fault_injection_only_where_asked():
    faults = FaultInjector(FaultInjectionConfig(nan_loss_at_steps="2, 5"))
    one = torch.ones(())
    assert faults.loss(1, one) == 1 and math.isnan(faults.loss(2, one)) and math.isnan(faults.loss(5, one))
    faults.in_save(3, "writing")  # nothing asked: returns
    assert FaultInjector(FaultInjectionConfig()).nan_steps == set()


@pytest.mark.parametrize("agg,expected", [("token_mean", 9.0), ("seq_mean_token_mean", 2.0)])
def test_denominator_is_global_over_the_batch(agg, expected):
    mode = make_loss_mode(AlgorithmConfig(loss_mode="grpo", loss_agg=agg))
    samples = [SimpleNamespace(response=[1] * 4), SimpleNamespace(response=[1] * 5), SimpleNamespace(response=[])]
    assert mode.denominator(samples) == expected


def test_opsd_teacher_reads_the_reference_solution_and_falls_back_to_the_answer():
    with_trace = PromptRow(id="a", problem="2+2?", answer="4", solution="<thought>2 and 2 make 4</thought><answer>4</answer>")
    bare = PromptRow(id="b", problem="3+3?", answer="6")
    templates = PromptTemplates()
    for name in ("opsd", "grpo_opsd"):
        mode = make_loss_mode(AlgorithmConfig(loss_mode=name))
        assert mode.privileged_context(with_trace) == with_trace.solution and not mode.context_fallback(with_trace)
        assert mode.privileged_context(bare) == "6" and mode.context_fallback(bare)
        text = templates.teacher_text(with_trace, mode.privileged_context(with_trace))
        assert "Here is a reference solution:\n<thought>2 and 2 make 4</thought>" in text
        answer_only = make_loss_mode(AlgorithmConfig(loss_mode=name, opsd_context="answer"))
        assert answer_only.privileged_context(with_trace) == "4" and answer_only.context_fallback(with_trace) is None
    rlsd = make_loss_mode(AlgorithmConfig(loss_mode="rlsd"))  # RLSD's context is only ever the answer
    assert rlsd.privileged_context(with_trace) == "4" and rlsd.context_fallback(with_trace) is None


def test_leakage_detector_on_planted_responses():
    leaks = [
        "Given that the reference solution uses 9 values, the mean is 5.",  # the paper's examples
        "But wait, the reference solution says 'No', so the answer is No.",
        "According to the provided solution, x = 3.",
        "The given answer is 12, which matches.",
        "As the REFERENCE ANSWER states, 7.",
    ]
    clean = [
        "<thought>3 + 4 = 7</thought><answer>7</answer>",
        "The answer is 7 because 3 and 4 make 7.",
        "Let me find a solution: x = 2 solves it.",
        "",
    ]
    d = LeakageDetector()
    assert [d.refers(t) for t in leaks] == [True] * 5 and [d.refers(t) for t in clean] == [False] * 4
    assert d.share(leaks[:1] + clean[:3]) == 0.25 and d.share([]) == 0.0
    assert LeakageDetector([]).share(leaks) == 0.0  # [] turns it off
    custom = LeakageDetector([r"\bhint\b"])
    assert custom.refers("Using the hint, 5") and not custom.refers(leaks[0])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        LeakageDetector(["(unclosed"])
