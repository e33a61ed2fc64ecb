"""A small Llama trained for a few minutes on the bundled corpus, saved with its tokenizer."""
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from attnlab.heads.studies.conversion import sentence_pool

text = list(sentence_pool("train"))  # the bundled char_lm corpus's training sentences
bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.decoder = decoders.ByteLevel()  # decode() gives back the text (spaces, not "Ġ")
bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=2000,
                                                  special_tokens=["[UNK]", "[PAD]"]))
tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="[UNK]",
                                                 pad_token="[PAD]")
config = transformers.LlamaConfig(vocab_size=2000, hidden_size=128, intermediate_size=256,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(config)
ids = torch.tensor(tokenizer("\n".join(text))["input_ids"])
windows = ids[: len(ids) // 64 * 64].view(-1, 64)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
for step in range(300):
    batch = windows[torch.randint(len(windows), (16,))]
    loss = model(input_ids=batch, labels=batch).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(f"{len(windows)} windows of 64 tokens; training loss after 300 steps: {loss.item():.3f}")
model.save_pretrained("/tmp/tiny-llama")
tokenizer.save_pretrained("/tmp/tiny-llama")
