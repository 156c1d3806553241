# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: python3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Reproducing xGen-small at full scale
#
# > What reproducing xGen-small costs on TPU v5p slices, stage by stage, and the commands that run it.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/45_full_scale.ipynb)

# %%
#| default_exp scale

# %%
#| hide
# Colab only: JAX for this runtime's accelerator, xgen_small, and what this notebook imports besides. The runtime's
# own JAX is asked which accelerator it sees (in a subprocess, so nothing is imported here yet); device files decide
# when it cannot say (/dev/accel* or /dev/vfio for TPUs, nvidia-smi for GPUs).
import glob, os, shutil, subprocess, sys
if 'google.colab' in sys.modules:
    probe = subprocess.run([sys.executable, '-c', 'import jax; print(jax.default_backend())'], capture_output=True, text=True)
    backend = (probe.stdout.split() or [''])[-1] if probe.returncode == 0 else ''
    if backend not in ('tpu', 'gpu', 'cpu'):
        backend = 'tpu' if glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*') else 'gpu' if shutil.which('nvidia-smi') else 'cpu'
    jax_extra = {'gpu': 'cuda12'}.get(backend, backend)
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', f'jax[{jax_extra}]==0.10.2', 'fastcore==1.12.47',
                    'xgen_small @ git+https://github.com/xgen-small/xgen_small'], check=True)

# %% [markdown]
# Everything in this repository runs at toy scale on a CPU; the presets `xgen_4b` and `xgen_9b` are the same code
# at the paper's scale. Before anyone books a pod, they should know what a run will cost. This page computes it
# from three things, each stated so it can be changed:
#
# 1. **FLOPs per token**, from `train.flops_per_token` (notebook 18): $6N_\text{matmul} + 12\,L\,H\,h\,T$ for a training
#    step (forward and backward, PaLM's convention, attention counted over the full $T \times T$ score matrix), and
#    $2N_\text{matmul} + 4\,L\,H\,h\,T$ for a forward pass alone (reference log-probs, sampling).
# 2. **Tokens per stage.** Pre-training: the paper's 8 trillion tokens, at 8K tokens per sequence (the length our
#    presets and the `xgen` extension recipe start from; the report does not state it). Length extension: the
#    `xgen` recipe of notebook 20 (steps x batch x length). Post-training: the report gives no sizes, so the
#    defaults below are *our assumptions*, of a plausible order of magnitude, and labelled as such.
# 3. **Peak rate and utilisation.** A TPU v5p chip peaks at 459 TFLOP/s in bfloat16 (Google Cloud's published
#    figure). Model FLOPs utilisation (MFU) is assumed: 50% for 8K pre-training (in line with what MaxText reports
#    for Llama-class models on v5p), 40% for the long-sequence and post-training stages (ring attention and
#    smaller per-device batches cost efficiency), and 10% for autoregressive sampling, which is bound by memory
#    bandwidth rather than compute.
#
# A note on names: Cloud TPU v5p slices are named by TensorCores, two per chip, so `v5p-512` is 256 chips. The
# tables below count chips.

# %%
#| export
from __future__ import annotations

from dataclasses import dataclass

from xgen_small.config import ModelConfig
from xgen_small.extend import EXTENSION_PRESETS, ExtensionRecipe
from xgen_small.train import flops_per_token


# %%
from xgen_small.config import get_preset, param_counts

# %%
#| export
PEAK_BF16_FLOPS = {'v4': 275e12, 'v5e': 197e12, 'v5p': 459e12, 'v6e': 918e12}   # per chip, published dense bf16 peaks

def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    "A forward pass's matmul FLOPs per token: a third of the training step's."
    return flops_per_token(cfg, seq_len) / 3

@dataclass(frozen=True)
class PostTrainingSizes:
    "Post-training sizes the report does not give: our assumptions, in tokens (see the prose)."
    sft_tokens: float = 2e9              # instruction tokens seen, all epochs
    dpo_pairs: float = 2e5               # preference pairs ...
    dpo_tokens_per_side: float = 1024    # ... of this many tokens per reply (with its prompt)
    rl_steps: int = 1000
    rl_prompts_per_step: int = 256
    rl_group_size: int = 8
    rl_tokens_per_completion: float = 2048
    seq_len: int = 8192

@dataclass(frozen=True)
class StageCost:
    stage: str
    tokens: float                        # tokens processed (trained, or generated for sampling)
    seq_len: int
    flops: float
    mfu: float
    hours: float                         # on the given number of chips

def stage_costs(
    model: ModelConfig,
    chips: int,
    *,
    chip: str = 'v5p',
    pretrain_tokens: float = 8e12,
    pretrain_seq: int = 8192,
    recipe: ExtensionRecipe = EXTENSION_PRESETS['xgen'],
    post: PostTrainingSizes = PostTrainingSizes(),
    mfu_pretrain: float = 0.5,
    mfu_long: float = 0.4,
    mfu_post: float = 0.4,
    mfu_sample: float = 0.1,
) -> list[StageCost]:
    "FLOPs and wall-clock hours of every stage of the pipeline for `model` on `chips` chips of type `chip`."
    if chip not in PEAK_BF16_FLOPS: raise ValueError(f"unknown chip {chip!r}; have {sorted(PEAK_BF16_FLOPS)}")
    if chips < 1: raise ValueError(f"chips must be positive, got {chips}")
    rate = chips * PEAK_BF16_FLOPS[chip]
    out = []
    def add(stage, tokens, seq, flops, mfu):
        out.append(StageCost(stage, tokens, seq, flops, mfu, flops / (rate * mfu) / 3600))
    add(
        'pre-training',
        pretrain_tokens,
        pretrain_seq,
        pretrain_tokens * flops_per_token(model, pretrain_seq),
        mfu_pretrain,
    )
    for s in recipe.stages:
        n = s.steps * s.batch_size * s.seq_len
        add(f'extension: {s.name}', n, s.seq_len, n * flops_per_token(model, s.seq_len), mfu_long)
    L = post.seq_len
    add('SFT', post.sft_tokens, L, post.sft_tokens * flops_per_token(model, L), mfu_post)
    n = 2 * post.dpo_pairs * post.dpo_tokens_per_side          # both replies: trained, and scored once by the reference
    add(
        'DPO',
        n,
        int(post.dpo_tokens_per_side),
        n
        * (
            flops_per_token(model, int(post.dpo_tokens_per_side))
            + forward_flops_per_token(model, int(post.dpo_tokens_per_side))
        ),
        mfu_post,
    )
    g = post.rl_steps * post.rl_prompts_per_step * post.rl_group_size * post.rl_tokens_per_completion
    T = int(post.rl_tokens_per_completion)
    add('RL: sampling', g, T, g * forward_flops_per_token(model, T), mfu_sample)
    add('RL: scoring + update', g, T, g * (flops_per_token(model, T) + 2 * forward_flops_per_token(model, T)), mfu_post)
    return out

def cost_table(costs: list[StageCost], title: str = '') -> str:
    "A Markdown table of `stage_costs`, with totals."
    rows = [
        f"| {c.stage} | {c.tokens / 1e9:,.1f}B | {c.seq_len:,} | {c.flops:.2e} | {c.mfu:.0%} | {c.hours:,.1f} | "
        f"{c.hours / 24:,.1f} |"
        for c in costs
    ]
    tf, th = sum(c.flops for c in costs), sum(c.hours for c in costs)
    head = (
        f'**{title}**\n\n' if title else ''
    ) + '| stage | tokens | length | FLOPs | MFU | hours | days |\n|---|---:|---:|---:|---:|---:|---:|\n'
    return head + '\n'.join(rows) + f'\n| **total** | | | **{tf:.2e}** | | **{th:,.0f}** | **{th / 24:,.1f}** |'

# %% [markdown]
# ## The 4B model on 256 chips (`v5p-512`), and the 9B on 512 (`v5p-1024`)

# %%
from IPython.display import Markdown
from xgen_small.config import num_params
c4, c9 = stage_costs(get_preset('xgen_4b'), 256), stage_costs(get_preset('xgen_9b'), 512)
Markdown(cost_table(c4, f"xgen_4b ({num_params(get_preset('xgen_4b')) / 1e9:.2f}B parameters), 256 v5p chips") + '\n\n' +
         cost_table(c9, f"xgen_9b ({num_params(get_preset('xgen_9b')) / 1e9:.2f}B parameters), 512 v5p chips"))

# %% [markdown]
# Pre-training is almost all of it: 8T tokens is ~850 times the extension's 9.4B, and post-training, even with
# generous assumptions, adds well under 1%. The 128K and 256K stages cost more per token than 8K because the
# attention term grows with length: at 256K it is 309 GFLOP per token against 22 for the matmuls. Checks of the
# arithmetic by hand: the 4B preset has $N_\text{matmul} = 3.62\text{B}$ (its 131K x 3072 input embedding is a
# lookup, not a matmul), so 8K pre-training costs $6 \times 3.62\text{B} + 12 \cdot 32 \cdot 24 \cdot 128 \cdot 8192
# = 21.7 + 9.7 = 31.4$ GFLOP per token, and $8 \times 10^{12}$ tokens need $2.5 \times 10^{23}$ FLOPs: at 50% of
# $256 \times 459$ TFLOP/s that is $4.3 \times 10^6$ s, about 49 days. A pod slice four times larger (`v5p-2048`)
# brings it to about 12 days, if the utilisation holds.

# %%
from fastcore.test import test_close, test_eq, test_fail
cfg4 = get_preset('xgen_4b')
pc = param_counts(cfg4)
n_matmul = pc['attention'] + pc['mlp'] + (pc['lm_head'] or pc['embedding'])
test_close(n_matmul / 1e9, 3.62, eps=0.01)
test_close(flops_per_token(cfg4, 8192), 6 * n_matmul + 12 * 32 * 24 * 128 * 8192, eps=1)
pre = c4[0]
test_close(pre.flops, 8e12 * flops_per_token(cfg4, 8192), eps=1e9)
test_close(pre.hours, pre.flops / (256 * 459e12 * 0.5) / 3600, eps=1e-6)
test_close(pre.hours / 24, 49.5, eps=0.3)
test_close(stage_costs(cfg4, 1024)[0].hours / 24, 49.5 / 4, eps=0.1)
test_close((flops_per_token(cfg4, 262_144) - 6 * n_matmul) / 1e9, 309, eps=1)      # attention alone at 256K: 309 GFLOP
ext = [c for c in c4 if c.stage.startswith('extension')]
test_eq([c.seq_len for c in ext], [32_768, 131_072, 262_144])
test_close(sum(c.tokens for c in ext) / 1e9, 9.4, eps=0.05)
assert pre.flops > 0.9 * sum(c.flops for c in c4)                      # pre-training dominates
test_fail(lambda: stage_costs(cfg4, 256, chip='h100'), contains='unknown chip')

# %% [markdown]
# ## The meshes
#
# The mesh is built by `MeshConfig` (notebook 13) from the device count, and for extension stages by `stage_mesh`
# (notebook 20): the stage's sequence-parallel degree, and every other chip on the `fsdp` axis, which shards the
# batch. The batch must fill that axis, so the sequence degree has to grow as the batch shrinks. The `xgen`
# preset's degrees (1, 4, 8) fit slices of up to 128 chips; on 256 chips its first stage has 128 rows for a
# 256-way FSDP axis, and `stage_mesh` says so rather than building a mesh that would leave chips idle. Raising
# the degrees to (2, 8, 16) gives, on 256 chips:
#
# | stage | sequence length | mesh (data x fsdp x sequence x tensor) | tokens per chip per step |
# |---|---:|---|---:|
# | pre-training | 8,192 | 1 x 256 x 1 x 1 | 512 x 8K / 256 = 16K |
# | extension stage 1 | 32,768 | 1 x 128 x 2 x 1 | 128 x 32K / 256 = 16K |
# | extension stage 2 | 131,072 | 1 x 32 x 8 x 1 | 32 x 128K / 256 = 16K |
# | over-length | 262,144 | 1 x 16 x 16 x 1 | 16 x 256K / 256 = 16K |
#
# The recipe keeps tokens per step (4M) and tokens per chip constant, so activation memory per chip stays flat while
# the sequence grows 32-fold: the batch shrinks and the sequence axis takes over. (The pre-training batch of 512
# sequences is our assumption; 4M tokens per step matches the extension stages.)

# %%
from dataclasses import replace
from xgen_small.config import ConfigError
from xgen_small.extend import stage_mesh
chips = 256
test_fail(lambda: stage_mesh(EXTENSION_PRESETS['xgen'].stages[0], chips), contains='do not divide')
for s in EXTENSION_PRESETS['xgen'].stages:
    s = replace(s, sequence=max(s.sequence, chips // s.batch_size))          # the smallest degree the batch can fill
    m = stage_mesh(s, chips)
    print(f"{s.name:>10}: {s.seq_len:>7,} tokens  data x fsdp x sequence x tensor = "
          f"{m.data} x {m.fsdp} x {m.sequence} x {m.tensor}  tokens per chip per step {s.batch_size * s.seq_len // chips:,}")
    test_eq(m.fsdp * m.sequence, chips); test_eq(s.batch_size * s.seq_len // chips, 16_384)

# %% [markdown]
# ## Running it on TPUs
#
# **Colab TPU** (a v5e-1 or v2-8 runtime: the `tiny` preset, or the 4B preset for a few steps to check shapes and
# memory). The notebooks' first cell installs `jax[tpu]`; from a terminal cell, the same commands as on a CPU:
#
# ```sh
# pip install "jax[tpu]==0.10.2" "xgen_small @ git+https://github.com/xgen-small/xgen_small"
# xgen-small pretrain --data store/ --out run/ --set model.vocab_size=4096 --steps 100
# ```
#
# **A multi-host pod slice.** Every host runs the same command; `init_distributed` (notebook 13) joins JAX's
# multi-host runtime from the TPU environment, `jax.devices()` then lists every chip of the slice, the mesh above is
# built over all of them, each host's loader reads only its own rows (`process_index` / `process_count`), and orbax
# writes one checkpoint collectively (the output directory must be shared storage, e.g. a `gs://` bucket):
#
# ```sh
# gcloud compute tpus tpu-vm ssh xgen --zone=us-east5-a --worker=all --command="
#   pip install 'jax[tpu]==0.10.2' 'xgen_small @ git+https://github.com/xgen-small/xgen_small' &&
#   xgen-small pretrain --data gs://BUCKET/store --out gs://BUCKET/run-4b --config pretrain_4b.json"
# ```
#
# with `pretrain_4b.json` a `TrainConfig` whose `model` is the `xgen_4b` preset (`param_dtype` float32 master
# weights, bfloat16 compute), `batch_size` 512, `seq_len` 8192 and the multi-phase schedule of notebook 09. The
# extension then runs with `xgen-small extend --recipe xgen`, and post-training with `xgen-small sft|dpo|rl`, each
# starting from the previous stage's run directory. What we have not done is run any of this on a pod: these
# numbers are the arithmetic of the code, not measurements.

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
