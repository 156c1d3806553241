"""Every evaluator sees a model answer correctly: an oracle (a scripted decoder that replies with the right answer,
through the real generator) scores 1.0 and an anti-oracle (the same, with a wrong answer) scores 0. If prompt
rendering, padding, decoding, stop tokens or answer extraction broke, these would fail (see tests/oracle.py)."""
import numpy as np
import pytest
from oracle import ScriptedDecoder

from xgen_small import ruler
from xgen_small.config import get_preset
from xgen_small.evaluate import evaluate_ruler
from xgen_small.extend import recall_accuracy, recall_prompt
from xgen_small.posttrain import chat, reply_accuracy
from xgen_small.tasks import arithmetic_tasks, code_tasks, instruction_set, instruction_tokenizer, task_rewards
from xgen_small.tokenizer import END_TURN, render_chat


@pytest.fixture(scope='module')
def tok():
    return instruction_tokenizer()


def _decoder(tok, script, fallback, max_seq_len=1024):
    cfg = get_preset('tiny', vocab_size=tok.vocab_size, max_seq_len=max_seq_len, compute_dtype='float32')
    return ScriptedDecoder(cfg, {tuple(p): r for p, r in script}, fallback)


def _wrong(text):
    "The same answer with every digit and every letter shifted: never right, same shape."
    def shift(c):
        for first, n in (('0', 10), ('a', 26), ('A', 26)):
            if ord(first) <= ord(c) < ord(first) + n: return chr((ord(c) - ord(first) + 1) % n + ord(first))
        return c
    return ''.join(map(shift, text))


@pytest.mark.parametrize('task', ruler.TASKS)
def test_ruler_oracle_scores_every_task(tok, task):
    L, n, seed = (1024 if task in ('cwe', 'fwe') else 256), 3, 0                   # word lists need room
    samples = [ruler.make_sample(tok, task, L, seed + i) for i in range(n)]          # what evaluate_ruler draws
    for answer, want in ((ruler.answer_text, 1.0), (lambda s: _wrong(ruler.answer_text(s)), 0.0)):
        # the model's context is exactly L, as at the last length of a run: every prompt + its own budget must fit
        model = _decoder(tok, [(s.input_ids, tok.encode(answer(s)) + [tok.eos_id]) for s in samples], tok.eos_id, L)
        row, = evaluate_ruler(model, tok, (task,), (L,), n=n, seed=seed, batch=2)
        assert (row['exact'], row['recall']) == (want, want), (task, answer(samples[0]))


def test_passkey_recall_oracle(tok):
    rng = np.random.default_rng(12_345)                                                # recall_accuracy's draws
    pairs = [recall_prompt(tok, rng) for _ in range(6)]
    for value, want in ((lambda v: v, 1.0), (_wrong, 0.0)):
        model = _decoder(tok, [(p, tok.encode(f' {value(v)}.') + [tok.eos_id]) for p, v in pairs], tok.eos_id)
        assert recall_accuracy(model, tok, n=6) == want


def test_reply_accuracy_oracle(tok):
    convs = instruction_set(12, seed=5, split='test')
    end = tok.token_id(END_TURN)
    prompts = [render_chat(tok, c['messages'][:-1], add_generation_prompt=True).ids for c in convs]
    right = [c['messages'][-1]['content'] for c in convs]
    model = _decoder(tok, [(p, tok.encode(r) + [end]) for p, r in zip(prompts, right)], end)
    assert reply_accuracy(model, tok, convs, max_new_tokens=200)['all'] == 1.0
    assert chat(model, tok, [c['messages'][:-1] for c in convs[:3]], 200) == right[:3]
    wrong = [right[(i + 1) % len(right)] + ' No.' for i in range(len(right))]          # another conversation's reply
    model = _decoder(tok, [(p, tok.encode(r) + [end]) for p, r in zip(prompts, wrong)], end)
    assert reply_accuracy(model, tok, convs, max_new_tokens=200)['all'] == 0.0


def test_verifiable_rewards_through_the_chat_path(tok):
    # RL's held-out evaluation: chat() replies, task_reward scores them
    tasks = arithmetic_tasks(6, split='test') + code_tasks(3)
    end = tok.token_id(END_TURN)
    prompts = [render_chat(tok, t['prompt'], add_generation_prompt=True).ids for t in tasks]
    solutions = [f"The answer is {t['answer']}." for t in tasks[:6]] + [t['solution'] for t in tasks[6:]]
    wrong = [f"The answer is {int(t['answer']) + 1}." for t in tasks[:6]] + \
            [s.replace('return', 'return None and', 1) for s in solutions[6:]]      # None: wrong for every test
    for texts, want in ((solutions, 1.0), (wrong, 0.0)):
        model = _decoder(tok, [(p, tok.encode(s) + [end]) for p, s in zip(prompts, texts)], end)
        replies = chat(model, tok, [t['prompt'] for t in tasks], 64)
        assert replies == texts  # the text survives the round trip
        assert task_rewards(tasks, replies) == [want] * len(tasks)
