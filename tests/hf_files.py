"""Tokenizer files as a released checkpoint ships them, built locally (nothing is downloaded): a byte-level BPE
`tokenizer.json` with Llama 3's special tokens and a `tokenizer_config.json` with Llama 3's chat template."""
import json
from pathlib import Path

LLAMA3_SPECIALS = ['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>']
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def write_llama3_style_tokenizer(d, texts, vocab_size: int = 1500) -> Path:
    "Train a byte-level BPE on `texts` and write `tokenizer.json` and `tokenizer_config.json` into `d`."
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    d = Path(d); d.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLAMA3_SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(d / 'tokenizer.json'))
    (d / 'tokenizer_config.json').write_text(json.dumps(dict(
        chat_template=LLAMA3_TEMPLATE, bos_token='<|begin_of_text|>', eos_token='<|eot_id|>',
        tokenizer_class='PreTrainedTokenizerFast')))
    return d


def write_tiny_checkpoint(d, vocab_size: int = 600) -> Path:
    "A random `tiny` model saved as a Llama-format checkpoint, with a tokenizer of `vocab_size` and its template."
    from flax import nnx

    from xgen_small.config import get_preset
    from xgen_small.data.sample import load_sample
    from xgen_small.hf import save_hf_checkpoint
    from xgen_small.model import Decoder
    d = write_llama3_style_tokenizer(d, [x['text'] for x in load_sample()[:200]], vocab_size=vocab_size)
    save_hf_checkpoint(Decoder(get_preset('tiny', vocab_size=vocab_size, max_seq_len=512), rngs=nnx.Rngs(0)), d)
    return d
