"""docs/conversion.md, "Cached generation": beam search with the cache on a
converted Llama equals beam search without it.

Run: python docs/results/convert-cache/beam_search.py
(its output is quoted in docs/conversion.md).
"""
import torch, transformers
from attnlab.integrations.convert import convert

config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
torch.manual_seed(0)
model = convert(transformers.LlamaForCausalLM(config).eval(), "hedgehog")

prompts = torch.tensor([[5, 17, 42, 8, 23], [61, 3, 77, 14, 30]])
options = dict(num_beams=3, num_return_sequences=2, max_new_tokens=6, do_sample=False,
               pad_token_id=0, output_scores=True, return_dict_in_generate=True)
out = model.generate(prompts, use_cache=True, **options)
print("sequences:", out.sequences.tolist())
print("scores:", [round(s, 4) for s in out.sequences_scores.tolist()])
print("cache:", out.cache.layers[0])
plain = model.generate(prompts, use_cache=False, **options)
print("same as use_cache=False:", torch.equal(out.sequences, plain.sequences),
      "| largest score difference:",
      f"{(out.sequences_scores - plain.sequences_scores).abs().max().item():.1e}")

try:  # assisted decoding (here prompt lookup) rolls back rejected draft tokens
    model.generate(prompts[:1].repeat(1, 3), prompt_lookup_num_tokens=2, max_new_tokens=3,
                   do_sample=False, pad_token_id=0)
except ValueError as err:
    print("ValueError:", err)
