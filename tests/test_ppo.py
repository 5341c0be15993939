"""PPO: the rollout's experience tensors against each row alone in float64, reply caps, seeds and the prompt
schedule; GAE on a hand-checked sequence, the clipped policy and value losses and the KL penalty against float64
references, the KL controller, no update from zero advantages, frozen reference and reward model, exact resume
after SIGTERM and kill -9, and 2 ranks under ZeRO-2 equal to 1."""

import math
import os
import signal

import pytest
import torch
from align_helpers import model_chain, stage_overrides, train_steps, write_reward_export
from chat_helpers import run_config, train_run
from dist_helpers import finish, single, torchrun, wait_for
from helpers import train_records

from megagpt.align_objectives import (
    KLController,
    entropy,
    gae,
    kl_penalised_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    token_logprobs,
    whiten,
)
from megagpt.dataset import Dataset
from megagpt.export import export
from megagpt.frozen_models import load_reference
from megagpt.inference import load_for_inference

TIMING = ("tokens_per_sec", "rollout_tokens_per_sec")


@pytest.fixture(scope="module")
def chain(shakespeare_dataset, tmp_path_factory):
    return model_chain(shakespeare_dataset, tmp_path_factory.mktemp("chain"))


def ppo_overrides(chain, **values):
    return stage_overrides("ppo", chain["prefs"], chain["sft"], align_reward_model=str(chain["reward"]),
                           align_max_new_tokens=12, **values)


# ---------------------------------------------------------------- rollouts: batched sampling


@pytest.mark.parametrize("lockstep", [False, True])
def test_batched_replies_equal_each_prompt_sampled_alone_with_its_seed(lockstep):
    """Prompts of lengths 1..13 in one batch, each row with its own generator, give the tokens (and stops) that
    megagpt/chat.py's one-prompt sampler gives each prompt alone with the same seed; caps past a row's room,
    replies that stop early and ones cut at their cap included."""
    from megagpt.chat import generate_reply
    from megagpt.config import ModelConfig
    from megagpt.generate import generate_replies
    from megagpt.model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=24, vocab_size=7)).eval()
    stop = 3  # 1 in 7: some replies stop early, some reach their cap
    prompts = [torch.randint(0, 7, (n,)).tolist() for n in (5, 1, 13, 5, 8, 2)]
    caps = [12, 6, 11, 0, 16, 22]  # 13 + 11 = 24 = block_size: the longest fills the block
    seeds = [int(s) for s in torch.randint(0, 2**31, (len(prompts),))]
    batched = generate_replies(model, prompts, caps, stop, [torch.Generator().manual_seed(s) for s in seeds],
                               temperature=1.3, lockstep=lockstep)
    for prompt, cap, seed, (ids, stopped) in zip(prompts, caps, seeds, batched, strict=True):
        alone = generate_reply(model, prompt, stop, cap, temperature=1.3, top_k=None, top_p=None,
                               generator=torch.Generator().manual_seed(seed))
        assert (ids, stopped) == (alone.ids + [stop] * alone.stopped, alone.stopped)
    ends = {"stopped" if stopped else "cut" if len(ids) == cap else "?"
            for (ids, stopped), cap in zip(batched, caps, strict=True)}
    assert ends == {"stopped", "cut"}


def test_batched_greedy_replies_equal_generate_on_each_prompt():
    from megagpt.config import ModelConfig
    from megagpt.generate import generate, generate_replies
    from megagpt.model import GPT

    torch.manual_seed(1)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=20, vocab_size=9)).eval()
    prompts = [torch.randint(0, 9, (n,)).tolist() for n in (4, 9, 1)]
    batched = generate_replies(model, prompts, [10, 10, 10], None, [torch.Generator()] * 3, temperature=0)
    for prompt, (ids, stopped) in zip(prompts, batched, strict=True):
        alone = generate(model, torch.tensor([prompt]), 10, temperature=0)[0, len(prompt):].tolist()
        assert not stopped and ids == alone


def test_a_reply_is_capped_where_prompt_and_reply_fill_the_block():
    from megagpt.config import ModelConfig
    from megagpt.model import GPT
    from megagpt.rollout import sample_reply

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=12, vocab_size=7)).eval()
    never = 7  # no token of the vocabulary: the replies run to their cap
    reply, stopped = sample_reply(model, [1] * 9, never, 50, 1.0, seed=3)
    assert len(reply) == 12 - 9 and not stopped  # the block's room, not max_new_tokens
    assert len(sample_reply(model, [1] * 4, never, 5, 1.0, seed=3)[0]) == 5  # max_new_tokens, room to spare


def test_prompt_seeds_differ_by_seed_position_and_stream():
    from megagpt.rollout import prompt_seed

    seeds = {prompt_seed(seed, position, stream) for seed in (0, 1) for position in (0, 1, 7) for stream in (0, 1)}
    assert len(seeds) == 12  # evaluations (stream 1) never reuse a training rollout's seed


def test_each_step_rolls_out_the_next_global_batches_once_on_any_number_of_ranks():
    """Step s holds global positions [s·M·G, (s+1)·M·G) (M mini-batches of G prompts), each once, split over the
    ranks; mini-batch j of 2 ranks is what 1 rank with twice the accumulation holds; the state resumes the step."""
    from megagpt.preference_data import PromptSchedule

    two = [PromptSchedule(50, 2, 3, 2, rank, 2, seed=0) for rank in range(2)]
    one = PromptSchedule(50, 2, 6, 2, 0, 1, seed=0)
    for step in range(3):
        got = [p for s in two for minibatch in s.step_positions(step) for micro in minibatch for p in micro]
        assert sorted(got) == list(range(step * 24, (step + 1) * 24))
        for j in range(2):
            ranks = {p for s in two for micro in s.step_positions(step)[j] for p in micro}
            assert ranks == {p for micro in one.step_positions(step)[j] for p in micro}
    assert one.load_state_dict(two[0].state_dict(5)) == 5


def _float64_row(model, ids: list[int]) -> torch.Tensor:
    """The first output of a float64 copy of model on one row alone (no padding, no other rows)."""
    import copy

    with torch.no_grad():
        return copy.deepcopy(model).double()(torch.tensor([ids]))[0][0]


def test_experience_holds_each_reply_tokens_logprobs_values_and_score_as_its_row_alone_gives():
    """Rows of several prompt and reply lengths, against each row run alone through float64 copies: position t
    holds the action token t + 1 (mask 1 exactly on positions P-1 .. P+n-2), log-probs of logits / temperature
    for the policy and the reference, the value at t, the reward model's score at the reply's last token minus the
    penalty where the reply never stopped, and 0 everywhere off the mask."""
    from megagpt.config import ModelConfig
    from megagpt.model import GPT
    from megagpt.reward_model import PolicyWithValue, RewardModel
    from megagpt.rollout import experience

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=11)
    policy, reference, reward = PolicyWithValue(cfg, cfg).eval(), GPT(cfg).eval(), RewardModel(cfg).eval()
    for head in (policy.value.score, reward.score):  # a random head: every value and score differs
        torch.nn.init.normal_(head.weight)
        torch.nn.init.normal_(head.bias)
    prompts, replies = [[1, 2, 3], [4], [5, 6, 7, 8, 9]], [[7, 3, 10], [2, 2, 2, 2, 1], [6]]
    stopped = [True, False, True]
    temperature, penalty = 0.7, 0.5
    got = experience(policy, reference, reward, prompts, replies, stopped, temperature, penalty, "cpu")
    width = max(len(p) + len(r) for p, r in zip(prompts, replies, strict=True)) - 1
    want = {name: torch.zeros(3, width, dtype=torch.float64) for name in ("mask", "logprobs", "ref", "values", "h")}
    scores = []
    for i, (prompt, reply, stop) in enumerate(zip(prompts, replies, stopped, strict=True)):
        row = prompt + reply
        logits, ref_logits = _float64_row(policy, row) / temperature, _float64_row(reference, row) / temperature
        values, row_scores = _float64_row(policy.value, row), _float64_row(reward, row)
        for j, token in enumerate(reply):
            t = len(prompt) - 1 + j  # the logits at t predict the reply's token j
            probs = logits[t].softmax(-1)
            want["mask"][i, t] = 1.0
            want["logprobs"][i, t] = probs[token].log()
            want["ref"][i, t] = ref_logits[t].softmax(-1)[token].log()
            want["values"][i, t] = values[t]
            want["h"][i, t] = -(probs * probs.log()).sum()
        scores.append(row_scores[len(row) - 1].item() - penalty * (not stop))
    for name, tensor in (("mask", got.mask), ("logprobs", got.logprobs), ("ref", got.ref_logprobs),
                         ("values", got.values), ("h", got.entropy)):
        assert torch.allclose(tensor.double(), want[name], atol=1e-5), name
    assert got.scores.double().tolist() == pytest.approx(scores, abs=1e-5)
    assert got.stopped.tolist() == [1.0, 0.0, 1.0]


# ---------------------------------------------------------------- the objectives, on fixed tensors


def test_gae_on_a_hand_checked_sequence():
    """Row 0: a prompt position, a reply of 3 actions, a padding position; row 1: a 1-token reply at the end.
    Values off the reply (9.0) must not leak in. γ = 0.9, λ = 0.8, so γλ = 0.72:
      δ3 = 1.0 - 0.3 = 0.7            A3 = 0.7
      δ2 = -0.1 + 0.9·0.3 - 0.4 = -0.23   A2 = -0.23 + 0.72·0.7 = 0.274
      δ1 = 0.0 + 0.9·0.4 - 0.5 = -0.14    A1 = -0.14 + 0.72·0.274 = 0.05728
      row 1: A4 = 0.5 - 0.2 = 0.3;  returns R = A + V."""
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.float64)
    rewards = torch.tensor([[0, 0.0, -0.1, 1.0, 0], [0, 0, 0, 0, 0.5]], dtype=torch.float64)
    values = torch.tensor([[9.0, 0.5, 0.4, 0.3, 9.0], [9.0, 9.0, 9.0, 9.0, 0.2]], dtype=torch.float64)
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    expected = torch.tensor([[0, 0.05728, 0.274, 0.7, 0], [0, 0, 0, 0, 0.3]], dtype=torch.float64)
    assert torch.allclose(advantages, expected, atol=1e-12)
    assert torch.allclose(returns, (expected + values) * mask, atol=1e-12)


def test_gae_with_lambda_one_and_gamma_one_is_the_reward_to_go_minus_the_value():
    torch.manual_seed(0)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.float64)
    rewards, values = torch.randn(1, 9, dtype=torch.float64) * mask, torch.randn(1, 9, dtype=torch.float64)
    advantages, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = [sum(rewards[0, t:].tolist()) for t in range(9)]
    assert advantages[0, 2:7].tolist() == pytest.approx([to_go[t] - values[0, t].item() for t in range(2, 7)])


def test_kl_penalty_is_per_token_and_the_score_is_added_at_the_last_reply_token():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float32)
    logp = torch.tensor([[-9.0, -1.0, -2.0, -0.5], [-0.1, -0.3, -7.0, -7.0]])
    ref = torch.tensor([[-1.0, -1.5, -1.0, -0.25], [-0.2, -0.1, -1.0, -1.0]])
    scores = torch.tensor([2.0, -1.0])
    rewards, kl = kl_penalised_rewards(logp, ref, mask, scores, kl_coef=0.1)
    expected = [[0.0, -0.1 * 0.5, -0.1 * -1.0, -0.1 * -0.25 + 2.0], [-0.1 * 0.1, -0.1 * -0.2 - 1.0, 0.0, 0.0]]
    assert rewards.double().tolist() == [pytest.approx(row, abs=1e-6) for row in expected]
    assert kl.sum(dim=1).tolist() == pytest.approx([0.5 - 1.0 - 0.25, 0.1 - 0.2], abs=1e-6)


def _reference_policy_loss(logp, old, adv, mask, eps):
    """Element by element in float64: max(-A ρ, -A clip(ρ)); which term won; ½ (log ρ)²."""
    terms, clipped, kl = [], [], []
    for lp, o, a, m in zip(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), strict=True):
        if m:
            ratio = math.exp(lp - o)
            plain, clip = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
            terms.append(max(plain, clip))
            clipped.append(float(clip > plain))
            kl.append(0.5 * (lp - o) ** 2)
    n = len(terms)
    return sum(terms) / n, sum(clipped) / n, sum(kl) / n


def test_clipped_policy_loss_its_gradient_and_clip_fraction_on_a_fixed_batch():
    eps = 0.2
    old = torch.zeros(6)
    ratios = [1.5, 0.5, 0.5, 1.5, 1.1, 3.0]  # A>0 clipped, A>0 not, A<0 clipped, A<0 not, inside, masked out
    adv = torch.tensor([1.0, 2.0, -1.0, -0.5, 0.7, 5.0])
    mask = torch.tensor([1.0, 1, 1, 1, 1, 0])
    logp = torch.tensor([math.log(r) for r in ratios], requires_grad=True)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, eps)
    ref_loss, ref_clipfrac, ref_kl = _reference_policy_loss(logp.detach().double(), old.double(), adv.double(),
                                                            mask, eps)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(ref_clipfrac) == 0.4
    assert stats["approx_kl"].item() == pytest.approx(ref_kl, rel=1e-6)
    loss.backward()
    # d/dlogp of -A ρ is -A ρ where the unclipped term wins, 0 where the clip holds it, 0 off the mask.
    expected = [0.0, -2.0 * 0.5 / 5, 0.0, 0.5 * 1.5 / 5, -0.7 * 1.1 / 5, 0.0]
    assert logp.grad.tolist() == pytest.approx(expected, abs=1e-6)


def test_clipped_value_loss_and_its_clip_fraction_on_a_fixed_batch():
    eps = 0.2
    old = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.5])
    new = torch.tensor([0.5, -0.1, 1.3, 0.7, 9.0], requires_grad=True)
    returns = torch.tensor([1.0, 0.2, 0.0, 2.0, 0.0])
    mask = torch.tensor([1.0, 1, 1, 1, 0])
    loss, clipfrac = ppo_value_loss(new, old, returns, mask, eps)
    terms, won = [], []
    for v, o, r in zip(new.tolist()[:4], old.tolist()[:4], returns.tolist()[:4], strict=True):
        v_clip = o + min(max(v - o, -eps), eps)
        terms.append(max((v - r) ** 2, (v_clip - r) ** 2))
        won.append(float((v_clip - r) ** 2 > (v - r) ** 2))
    assert loss.item() == pytest.approx(0.5 * sum(terms) / 4, rel=1e-6)
    assert clipfrac.item() == pytest.approx(sum(won) / 4)
    loss.backward()
    assert new.grad[4].item() == 0.0


def test_whitening_uses_the_given_batch_moments_and_zeroes_off_the_mask():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    got = whiten(x, mask, mean=2.0, var=2.0 / 3)
    assert got.tolist()[0] == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5), 0.0], rel=1e-6)


def test_adaptive_kl_controller_moves_toward_the_target_and_a_fixed_one_stays():
    adaptive, fixed = KLController(0.1, target=6.0, horizon=1000), KLController(0.1)
    adaptive.update(12.0, 100)  # error clipped to +0.2
    fixed.update(12.0, 100)
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000)) and fixed.value == 0.1
    adaptive.update(5.4, 100)  # error -0.1
    assert adaptive.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 0.1))


def test_token_logprobs_and_entropy_match_float64_even_for_very_unlikely_tokens():
    """Logits 300 apart: log p of the unlikely token is about -300, not -inf (log of an underflowed softmax)."""
    logits = torch.tensor([[[0.0, -300.0, 2.0, 1.0], [5.0, 5.0, -1.0, 0.5]]])
    tokens = torch.tensor([[1, -1]])  # -1: nothing picked, read as token 0
    rows = logits[0].double()
    logz = rows.logsumexp(-1)
    assert token_logprobs(logits, tokens)[0].double().tolist() == pytest.approx(
        [(rows[0, 1] - logz[0]).item(), (rows[1, 0] - logz[1]).item()], rel=1e-6)
    probs = (rows - logz[:, None]).exp()
    expected = [-sum(p * math.log(p) for p in row.tolist() if p > 0) for row in probs]
    assert entropy(logits)[0].double().tolist() == pytest.approx(expected, rel=1e-5)


def test_the_kl_controller_resumes_its_adapted_coefficient_and_keeps_the_configs_target():
    adapted = KLController(0.1, target=6.0, horizon=1000)
    adapted.update(12.0, 100)
    resumed = KLController(0.1, target=3.0, horizon=1000)  # the config's target changed across the resume
    resumed.load_state_dict(adapted.state_dict())
    assert resumed.value == adapted.value == pytest.approx(0.102) and resumed.target == 3.0


# ---------------------------------------------------------------- the stage


def _experience(mask, logprobs, ref_logprobs, values, scores):
    from megagpt.rollout import Experience

    mask = torch.tensor(mask)
    return Experience(ids=torch.zeros(len(mask), mask.size(1) + 1, dtype=torch.long), mask=mask,
                      logprobs=torch.tensor(logprobs), ref_logprobs=torch.tensor(ref_logprobs),
                      values=torch.tensor(values), scores=torch.tensor(scores), stopped=torch.ones(len(mask)),
                      entropy=torch.zeros_like(mask))


def test_a_rollout_whitens_advantages_over_every_reply_token_of_all_its_micro_batches():
    """Two micro-batches, β_KL = 0.5, γ = λ = 1 (A_t = reward-to-go - V_t), by hand. KL per token 0.5, 0 | 0, 0.5 | 0;
    rewards -0.25, 1 | 0, -1.25 | 2; A = 0.55, 0.9 | -1.55, -1.25 | 1.6: mean 0.05, population variance 7.625 / 5.
    Logged per reply: the score, score - β_KL·KL (0.75, -1.25, 2), KL; tokens are prompt + reply (4, 3, 4)."""
    from types import SimpleNamespace

    from megagpt.stages.ppo import PPOStage

    stage = PPOStage.__new__(PPOStage)  # score() reads only these
    stage.kl, stage.align = KLController(0.5), SimpleNamespace(gamma=1.0, lam=1.0)
    stage.dist = SimpleNamespace(world_size=1)
    a = _experience([[0.0, 1, 1]], [[0, -1.0, -2.0]], [[0, -1.5, -2.0]], [[0, 0.2, 0.1]], [1.0])
    b = _experience([[1.0, 1, 0], [0, 0, 1]], [[-0.5, -0.5, 0], [0, 0, -1.0]], [[-0.5, -1.0, 0], [0, 0, -1.0]],
                    [[0.3, 0.0, 0], [0, 0, 0.4]], [-1.0, 2.0])
    stats = stage.score([[a], [b]])
    deviations = [x - 0.05 for x in (0.55, 0.9, -1.55, -1.25, 1.6)]
    whitened = [d / math.sqrt(7.625 / 5 + 1e-8) for d in deviations]
    assert a.advantages.tolist() == [pytest.approx([0, *whitened[:2]], abs=1e-6)]
    assert b.advantages.tolist() == [pytest.approx([*whitened[2:4], 0], abs=1e-6),
                                     pytest.approx([0, 0, whitened[4]], abs=1e-6)]
    assert stats["reward_model_score"] == pytest.approx(2 / 3) and stats["kl"] == pytest.approx(1 / 3)
    assert stats["reward"] == pytest.approx(0.5) and stats["response_length"] == pytest.approx(5 / 3)
    assert stats["tokens"] == 4 + 3 + 4



def test_the_ppo_loss_is_the_policy_loss_plus_vf_coef_times_the_value_loss():
    """The old log-probs are the policy's own (ratio 1) and the new values the old ones (nothing clipped), so by hand
    over the two reply tokens: loss = -mean(A) + vf_coef · ½ mean((V - R)²)."""
    from types import SimpleNamespace

    from megagpt.stages.ppo import PPOStage

    torch.manual_seed(0)
    stage = PPOStage.__new__(PPOStage)  # ppo_loss() reads only this
    stage.align = SimpleNamespace(temperature=1.0, cliprange=0.2, cliprange_value=0.2, vf_coef=0.3)
    ids, logits = torch.randint(0, 5, (1, 4)), torch.randn(1, 4, 5)
    values = torch.tensor([[0.5, -0.2, 0.1, 0.0]])
    own = torch.log_softmax(logits.double()[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0].float()
    b = _experience([[0.0, 1, 1]], own.tolist(), own.tolist(), values[:, :-1].tolist(), [0.0])
    b.ids, b.advantages, b.returns = ids, torch.tensor([[0.0, 0.8, -0.2]]), torch.tensor([[0.0, 1.0, -1.0]])
    loss, stats = stage.ppo_loss(lambda _ids: (logits, values), b)
    policy = -(0.8 - 0.2) / 2
    value = 0.5 * ((-0.2 - 1.0) ** 2 + (0.1 + 1.0) ** 2) / 2
    assert stats["policy_loss"].item() == pytest.approx(policy, rel=1e-6)
    assert stats["value_loss"].item() == pytest.approx(value, rel=1e-6)
    assert loss.item() == pytest.approx(policy + 0.3 * value, rel=1e-6)

def test_zero_kl_and_a_constant_reward_leave_the_policy_where_a_zero_advantage_step_would(chain, tmp_path):
    """A reward model whose head is (w = 0, b = c) scores every reply c, and the value model (its copy) predicts c
    everywhere: with γ = 1 every δ is 0, so every advantage is 0. AdamW with a zero gradient then only decays the
    matrices: p (1 - lr·wd)^updates, the gains and biases stay."""
    constant = write_reward_export(tmp_path / "constant_rm", chain["reward"], bias=0.7)
    lr, wd, updates = 1e-3, 0.1, 2 * 2  # ppo_epochs x rollout_minibatches, one step
    cfg = run_config(stage_overrides("ppo", chain["prefs"], chain["sft"], align_reward_model=str(constant),
                                     align_kl_coef=0.0, align_gamma=1.0, align_ppo_epochs=2,
                                     align_rollout_minibatches=2, align_max_new_tokens=8, lr=lr, min_lr=lr,
                                     weight_decay=wd))
    run = train_steps(cfg, tmp_path / "run", 1)
    sft, _, _ = load_for_inference(chain["sft"])
    policy = {n: p.detach() for n, p in run.engine.module.named_parameters() if not n.startswith("value.")}
    for name, p in sft.named_parameters():
        expected = p.double() * (1 - lr * wd) ** updates if p.dim() >= 2 else p.double()
        assert torch.allclose(policy[name].double(), expected, rtol=1e-6, atol=1e-9), name
    assert run.stage._stats["reward_model_score"] == pytest.approx(0.7)
    assert run.stage._stats["policy_loss"] == 0.0


def test_ppo_moves_the_policy_and_leaves_reference_and_reward_model_bit_identical(chain, tmp_path):
    cfg = run_config(ppo_overrides(chain, lr=3e-3))
    run = train_steps(cfg, tmp_path / "run", 2)
    sft, _, _ = load_for_inference(chain["sft"])
    reward, _, _ = load_for_inference(chain["reward"])
    fresh_reference = load_reference(run.cfg, run.stage.dataset, torch.device("cpu"))
    for name, p in run.stage.reference.named_parameters():
        assert torch.equal(p, fresh_reference.state_dict()[name]) and not p.requires_grad, name
        assert torch.equal(p, sft.state_dict()[name]), name
    for name, p in run.stage.reward_model.named_parameters():
        assert torch.equal(p, reward.state_dict()[name]) and not p.requires_grad, name
    policy = dict(run.engine.module.named_parameters())
    assert not torch.equal(policy["transformer.h.0.attn.c_attn.weight"], sft.transformer.h[0].attn.c_attn.weight)
    # the value model (the reward model's copy at the start) trains too
    assert not torch.equal(policy["value.transformer.h.0.attn.c_attn.weight"],
                           reward.transformer.h[0].attn.c_attn.weight)


def test_ppo_logs_its_statistics_every_step_and_its_runs_load_as_the_policy(chain, tmp_path):
    run_dir = tmp_path / "run"
    train_run(run_dir, ppo_overrides(chain, max_steps=2, eval_interval=2, sample_tokens=8))
    records = train_records(run_dir)
    keys = {"reward_model_score", "reward", "kl", "kl_coef", "entropy", "clipfrac", "value_clipfrac", "value_loss",
            "policy_loss", "approx_kl", "response_length", "stop_rate", "tokens_per_sec"}
    assert [r["step"] for r in records] == [1, 2] and all(keys <= set(r) for r in records)
    assert records[0]["kl"] == 0.0  # the first rollout's policy is the reference
    assert 1 <= records[0]["response_length"] <= 12 and records[0]["entropy"] > 0
    model, _, cfg = load_for_inference(run_dir)
    assert cfg.train.stage == "ppo" and type(model).__name__ == "GPT"
    assert "assistant: " in (run_dir / "samples" / "step_000002.txt").read_text()
    # exported for transformers: the policy alone, the same logits (PPO's value model stays in the run)
    export(run_dir, tmp_path / "hf", fmt="hf")
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids)[0], atol=1e-5)


@pytest.mark.distributed
def test_interrupted_ppo_run_resumes_with_identical_statistics(chain, tmp_path):
    """SIGTERM (saves at the step's end, exits 0), resume, kill -9 between checkpoints, resume to the end: every
    step's statistics equal an uninterrupted run's."""
    steps = 14

    def overrides():
        return ppo_overrides(chain, max_steps=steps, checkpoint_interval=3, lr=3e-3)

    straight, parted = tmp_path / "straight", tmp_path / "parted"
    train_run(straight, overrides())
    proc = single(parted, overrides())
    wait_for(lambda: len(train_records(parted)) >= 2, 120, "step 2")
    os.kill(proc.pid, signal.SIGTERM)
    assert finish(proc) == [0]
    stopped_at = max(r["step"] for r in train_records(parted))
    assert stopped_at < steps and (parted / "checkpoints" / "latest").read_text() == f"step_{stopped_at:06d}"
    proc = single(parted, overrides())
    wait_for(lambda: max((r["step"] for r in train_records(parted)), default=0) >= stopped_at + 4, 120,
             "4 steps after the resume")
    os.killpg(proc.pid, signal.SIGKILL)
    finish(proc, ok=False)
    assert max(r["step"] for r in train_records(parted)) < steps, "the run finished before the kill"
    finish(single(parted, overrides()))
    expected = {r["step"]: {k: v for k, v in r.items() if k not in TIMING} for r in train_records(straight)}
    got = {r["step"]: {k: v for k, v in r.items() if k not in TIMING} for r in train_records(parted)}
    assert sorted(got) == list(range(1, steps + 1))
    assert got == expected


def test_under_zero3_the_frozen_models_are_partitioned_and_score_as_replicated(chain):
    from megagpt.distributed import init_distributed

    init_distributed(1.0)
    sft, _, sft_cfg = load_for_inference(chain["sft"])
    vocab = sft_cfg.model.vocab_size
    sharded = run_config([*ppo_overrides(chain, zero_stage=3), f"model.vocab_size={vocab}"])
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = load_reference(sharded, Dataset(chain["prefs"]), torch.device("cpu"))
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in reference.parameters())  # only the partition
    with torch.no_grad():
        got, want = reference(ids)[0], sft(ids)[0]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert all(p.numel() == 0 for p in reference.parameters())  # released again after the forward


@pytest.mark.distributed
@pytest.mark.parametrize("zero", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_two_ranks_ppo_equals_one_rank(chain, tmp_path, zero):
    """1 rank accumulating 2 micro-batches and 2 ranks with 1 each roll out the same prompts with the same seeds;
    under ZeRO-3 the policy, the reference and the reward model are all partitioned across the 2 ranks."""
    def overrides(accum, zero):
        return ppo_overrides(chain, micro_batch_size=2, grad_accum_steps=accum, zero_stage=zero, max_steps=3,
                             lr=3e-3, align_rollout_minibatches=2, align_target_kl=0.5)

    train_run(tmp_path / "one", overrides(2, 0))
    finish(torchrun(tmp_path / "two", overrides(1, zero), 2))
    one, two = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "reward_model_score", "reward", "kl", "kl_coef_next", "entropy", "value_loss",
                    "approx_kl", "clipfrac", "response_length", "stop_rate"):
            assert b[key] == pytest.approx(a[key], rel=2e-5, abs=1e-7), (a["step"], key)  # measured <= 2.2e-6
    assert len({r["loss"] for r in one}) > 1
