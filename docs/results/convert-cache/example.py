import torch, transformers
from attnlab.integrations.convert import convert, converted_modules

config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
torch.manual_seed(0)
model = convert(transformers.LlamaForCausalLM(config).eval(), "hedgehog")
print("config.use_cache:", model.config.use_cache,
      "| generation_config.use_cache:", model.generation_config.use_cache)

seen = []
attn = converted_modules(model)[0][1].attn
attn.register_forward_pre_hook(lambda m, args, kw: seen.append(args[0].shape[1]),
                               with_kwargs=True)
prompt = torch.tensor([[5, 17, 42, 8, 23]])
out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0,
                     return_dict_in_generate=True)
print("tokens:", out.sequences.tolist())
print("tokens layer 0 saw per call:", seen)
print("cache:", out.cache.layers[0], "| length:", out.cache.get_seq_length())
again = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0,
                       use_cache=False)
print("same as use_cache=False:", torch.equal(out.sequences, again))

sparse = convert(transformers.LlamaForCausalLM(config).eval(), "sparsifiner")
try:
    sparse.generate(prompt, max_new_tokens=2, use_cache=True, pad_token_id=0)
except ValueError as err:
    print("ValueError:", err)
