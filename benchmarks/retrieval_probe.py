"""How fast does the tiny model learn to retrieve? A minimal training loop on synthetic retrieval documents.

    python benchmarks/retrieval_probe.py --data recall --seq 128 --rows 32 --steps 800 --save /tmp/recall_ckpt
    python benchmarks/retrieval_probe.py --data niah --steps 300 --init /tmp/recall_ckpt
    python benchmarks/retrieval_probe.py --data copy --steps 600
    python benchmarks/retrieval_probe.py --quick          # a seconds-long smoke run

Separate from `train` on purpose: documents are generated on the fly (no token store), each packed document is its
own attention segment with positions from 0, and the answer tokens are tracked, so the log shows teacher-forced
answer loss and accuracy as they move. Data: `recall` (`' key: 12345. <noise> key: 12345.'` with up to 24 noise
tokens; the answer is the second value), `niah` (RULER `niah_single` prompts of `--minlen` to `--seq` tokens plus
their answers), `copy` (a random span over the key-word and digit pieces, then the span again). Ends with
`niah_single` exact match at 256 / 512 / 1K. Used for notebook 20's section on forming the retrieval mechanism
(issue 7); about 0.4 s per step of 16 x 256 tokens on 2 CPU cores.
"""
import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from xgen_small import ruler
from xgen_small.config import get_preset
from xgen_small.data.sample import load_sample
from xgen_small.evaluate import evaluate_ruler
from xgen_small.extend import recall_prompt
from xgen_small.model import Decoder, model_with_params, params_of
from xgen_small.tokenizer import Tokenizer, train_tokenizer


def make_doc(kind: str, tok: Tokenizer, rng, i: int, seq: int, minlen: int, alphabet) -> tuple[list, list]:
    "One document's ids and a 0/1 mask of its answer tokens."
    if kind == 'niah':
        s = ruler.make_sample(
            tok, 'niah_single', int(rng.integers(minlen, seq)), 10_000_000 + i, ruler.RulerConfig(digits=5)
        )
        ans = tok.encode(ruler.answer_text(s))
        return s.input_ids + ans, [0] * len(s.input_ids) + [1] * len(ans)
    if kind == 'recall':
        p, value = recall_prompt(tok, rng)
        v = tok.encode(f' {value}.')
        return p + v, [0] * len(p) + [1] * len(v)
    if kind == 'copy':
        span = list(rng.choice(alphabet, int(rng.integers(8, seq // 2))))
        return span + span, [0] * len(span) + [1] * len(span)
    raise ValueError(f"unknown --data {kind!r}; expected niah, recall or copy")


def batches(a, tok, alphabet, seed: int = 1):
    "Rows of `a.seq` tokens packed with whole documents (a document that does not fit starts the next row)."
    rng, i, carry = np.random.default_rng(seed), seed * 10_000_000, None
    while True:
        X = np.zeros((a.rows, a.seq + 1), np.int32)
        S = np.zeros_like(X)
        P = np.zeros_like(X)
        M = np.zeros(X.shape, np.float32)
        for r in range(a.rows):
            n, seg = 0, 1
            while n < a.seq + 1:
                ids, am = carry or make_doc(a.data, tok, rng, i, a.seq, a.minlen, alphabet)
                carry, i = None, i + 1
                k = min(len(ids), a.seq + 1 - n)
                if k < len(ids) and n > 0: carry = (ids, am); break
                X[r, n:n + k] = ids[:k]; S[r, n:n + k] = seg; P[r, n:n + k] = np.arange(k); M[r, n:n + k] = am[:k]
                n += k; seg += 1
        same = ((S[:, :-1] == S[:, 1:]) & (S[:, 1:] > 0)).astype(np.float32)
        yield dict(
            inputs=X[:, :-1],
            targets=X[:, 1:],
            positions=P[:, :-1],
            segment_ids=S[:, :-1],
            weight=same,
            ans=M[:, 1:] * same,
        )


@nnx.jit
def train_step(model, opt, b):
    def loss_fn(model):
        logits = model(b['inputs'], b['positions'], b['segment_ids']).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, b['targets'])
        hit = logits.argmax(-1) == b['targets']
        n_ans = jnp.maximum(b['ans'].sum(), 1.0)
        return (ce * b['weight']).sum() / b['weight'].sum(), (
            (ce * b['ans']).sum() / n_ans,
            (hit * b['ans']).sum() / n_ans,
        )
    (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    opt.update(model, grads)
    return loss, aux


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--data', default='niah', choices=('niah', 'recall', 'copy'))
    ap.add_argument('--steps', type=int, default=600); ap.add_argument('--lr', type=float, default=3e-3)
    ap.add_argument('--rows', type=int, default=16); ap.add_argument('--seq', type=int, default=256)
    ap.add_argument('--b2', type=float, default=0.95); ap.add_argument('--wd', type=float, default=0.0)
    ap.add_argument('--layers', type=int, default=4); ap.add_argument('--minlen', type=int, default=96)
    ap.add_argument('--eval-every', type=int, default=100)
    ap.add_argument('--n', type=int, default=16, help='passkey prompts per length')
    ap.add_argument('--save', default=None, help='write the final parameters (orbax) here')
    ap.add_argument('--init', default=None, help='start from parameters saved with --save')
    ap.add_argument('--seed', type=int, default=0, help='model initialisation and data order')
    ap.add_argument('--quick', action='store_true', help='4 steps, 2 prompts per length')
    a = ap.parse_args(argv)
    if a.quick: a.steps, a.n, a.eval_every = 4, 2, 2
    tok = Tokenizer(train_tokenizer([d['text'] for d in load_sample()[:600]], 4096))
    alphabet = np.array(sorted({t for w in list(ruler.KEY_WORDS) + list('0123456789') for t in tok.encode(' ' + w)}))
    cfg = get_preset('tiny', n_layers=a.layers, max_seq_len=max(a.seq, 1024))
    model = Decoder(cfg, rngs=nnx.Rngs(a.seed))
    if a.init: model = model_with_params(cfg, ocp.PyTreeCheckpointer().restore(Path(a.init).absolute()))
    opt = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        optax.warmup_constant_schedule(0.0, a.lr, 50), b1=0.9, b2=a.b2, weight_decay=a.wd)), wrt=nnx.Param)
    it, t0, log = batches(a, tok, alphabet, seed=a.seed + 1), time.time(), []
    for s in range(1, a.steps + 1):
        loss, (ans_loss, ans_acc) = train_step(model, opt, {k: jnp.asarray(v) for k, v in next(it).items()})
        if s % a.eval_every == 0 or s == a.steps:
            log.append(dict(step=s, loss=float(loss), answer_loss=float(ans_loss), answer_acc=float(ans_acc)))
            print(
                f"step {s:>5}  loss {float(loss):.3f}  answer loss {float(ans_loss):.3f}  answer accuracy "
                f"{float(ans_acc):.2f}  "
                f"({time.time() - t0:.0f}s)",
                flush=True,
            )
    rows = evaluate_ruler(model, tok, ('niah_single',), (256, 512, 1024), n=a.n, cfg=ruler.RulerConfig(digits=5))
    out = dict(args=dict(vars(a)), log=log, passkey={r['length']: r['exact'] for r in rows},
               seconds=round(time.time() - t0))
    print(json.dumps({k: out[k] for k in ('passkey', 'seconds')}), flush=True)
    if a.save:
        ocp.PyTreeCheckpointer().save(
            Path(a.save).absolute(), jax.device_get(params_of(model)), force=True
        )
    return out


if __name__ == '__main__':
    main()
