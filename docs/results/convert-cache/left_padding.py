"""docs/conversion.md, "Cached generation": a left-padded batch of a converted
Llama generates what each prompt generates alone.

Run: python docs/results/convert-cache/left_padding.py
(its output is quoted in docs/conversion.md).
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from attnlab.integrations.convert import convert

torch.manual_seed(0)
config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                     initializer_range=0.3)
model = convert(LlamaForCausalLM(config).eval(), "hedgehog")

prompts = [[11, 42, 7, 93, 18, 5], [64, 3, 27], [50]]
width = max(map(len, prompts))
ids = torch.zeros(len(prompts), width, dtype=torch.long)      # pad id 0, on the left
mask = torch.zeros_like(ids)
for row, p in enumerate(prompts):
    ids[row, width - len(p):] = torch.tensor(p)
    mask[row, width - len(p):] = 1

greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
batch = model.generate(ids, attention_mask=mask, use_cache=True, **greedy)
for row, p in enumerate(prompts):
    alone = model.generate(torch.tensor([p]), use_cache=True, **greedy)
    print(f"prompt {p}: batched {batch[row, width:].tolist()}, "
          f"alone {alone[0, len(p):].tolist()}")
