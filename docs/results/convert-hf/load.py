import torch

from attnlab.heads.studies.conversion import sentence_pool
from attnlab.integrations.saved import load_converted, load_tokenizer, read_converted

folder = "/tmp/tiny-llama-hedgehog"
info = read_converted(folder)
print(info["source"]["path"], info["source"]["model_class"], info["mechanism"], info["kwargs"])
print("scores:", {k: round(v, 3) for k, v in info["recipe"]["scores"].items()
                  if isinstance(v, float)})
model = load_converted(folder)  # the source checkpoint is read again, offline
tokenizer = load_tokenizer(info["source"]["path"])
text = sentence_pool("test")[0]
ids = tokenizer(text, return_tensors="pt")["input_ids"]
with torch.no_grad():
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
print(f"{text[:60]!r}...: {ids.shape[1]} tokens, loss {loss.item():.4f}")
print(type(model.model.layers[0].self_attn).__name__, model.model.layers[0].self_attn.attn.name)
