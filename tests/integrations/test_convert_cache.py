"""Cached generation of converted decoders: each layer's attnlab decoding state lives in
transformers' ``DynamicCache`` (``integrations.cache.StateCacheLayer``), and ``generate`` feeds the
mechanism only the new token.

What must hold, on the tiny GPT-2, Llama, Qwen2 and Mistral (tests/integrations/tiny.py):
``generate(use_cache=True)`` gives the tokens of ``use_cache=False``, its per-step logits are
the full forward's of the final sequence, the attnlab modules see the prompt once and then one
token per step, RoPE continues from the cache's length, left padding works (GPT-2's learned
positions; RoPE models through per-row positions, tests/integrations/test_convert_padding.py),
beam search (the cache's sequences reordered,
selected or repeated through ``State.select``) gives the beams of ``use_cache=False``, a
mechanism without ``decode`` refuses a cache and still generates without one, and what a state
cannot do (cropping, so assisted decoding; a static cache; a sliding window overrun) is
refused with the reason.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("transformers")

import attnlab as al  # noqa: E402
from attnlab.integrations import convert as conv  # noqa: E402
from attnlab.integrations.cache import StateCacheLayer  # noqa: E402
from attnlab.integrations.convert import convert  # noqa: E402
from tests.integrations.tiny import VOCAB, WINDOW, build, inputs  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

DECODERS = ["GPT-2", "Llama", "Qwen2", "Mistral"]
# a linear mechanism (elu+1 feature maps), Hedgehog's learned feature maps, softmax's KV cache,
# and two scored ones with their own parameters: every one has decode=True
MECHANISMS = ["softmax", "linear", "hedgehog", "gated", "sigmoid"]
GREEDY = dict(do_sample=False, pad_token_id=0)
# the longest path of sums in a tiny decoder's logits (2 layers of hidden 32: q, k, v and o
# projections of 32 terms, scores of 8, at most 12 keys, the MLP's 32 + 64, the 32-wide head):
# the cached and the full forward sum the same terms in another order
ROUNDINGS = 512


def _converted(arch: str, mechanism: str) -> torch.nn.Module:
    return convert(build(arch), mechanism)


@functools.cache
def _prompt(length: int, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randint(3, VOCAB, (batch, length), generator=gen)


@contextmanager
def _seen(model: torch.nn.Module) -> Iterator[list[tuple[int, bool]]]:
    """(tokens, with a state) of every call of the first converted layer's attnlab module."""
    calls: list[tuple[int, bool]] = []
    attn = conv.converted_modules(model)[0][1].attn

    def record(module, args, kwargs):
        calls.append((args[0].shape[1], kwargs.get("state") is not None))

    handle = attn.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def _check_cached_generation(arch: str, mechanism: str, prompt_length: int = 5,
                             new: int = 5) -> None:
    model = _converted(arch, mechanism)
    assert model.generation_config.use_cache is True and model.config.use_cache is False
    prompt = _prompt(prompt_length)
    with _seen(model) as calls:
        cached = model.generate(prompt, max_new_tokens=new, use_cache=True, output_logits=True,
                                return_dict_in_generate=True, **GREEDY)
    # the state is used: the prompt once, then only the new token each step
    assert calls == [(prompt_length, True)] + [(1, True)] * (new - 1), calls
    cache = cached.cache
    assert all(isinstance(layer, StateCacheLayer) for layer in cache.layers)
    fed = prompt_length + new - 1  # the last token is generated, never fed
    assert cache.get_seq_length() == fed
    assert all(layer.state.position == fed for layer in cache.layers)
    with _seen(model) as calls:
        plain = model.generate(prompt, max_new_tokens=new, use_cache=False, **GREEDY)
    assert [n for n, _ in calls] == list(range(prompt_length, prompt_length + new))
    assert torch.equal(cached.sequences, plain), (arch, mechanism)
    # each step's logits are the full forward's at that position
    with torch.no_grad():
        full = model(cached.sequences, use_cache=False).logits
    steps = torch.stack(cached.logits, dim=1)
    assert_close(steps, full[:, prompt_length - 1:-1], roundings=ROUNDINGS,
                 msg=f"{mechanism} on {arch}")


def test_cached_generation_of_a_linear_mechanism_with_rope_and_gqa():
    """Hedgehog on Llama (RoPE, grouped kv heads), an odd prompt: same tokens and per-step
    logits as the full recomputation, the module fed one token per step."""
    _check_cached_generation("Llama", "hedgehog", prompt_length=5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_cached_generation_equals_the_full_forward(arch, mechanism):
    _check_cached_generation(arch, mechanism, prompt_length=7 if arch != "Mistral" else 5)


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", [m for m in al.available() if al.info(m).decode])
def test_every_decoding_mechanism_generates_with_its_state(mechanism):
    """Every mechanism with decode=True generates with its state as without, on Llama, or on
    GPT-2 when it has no RoPE option; those that convert onto neither (cca, rfa, shvit) are
    refused by convert for their layout, not for the cache."""
    for arch in ("Llama", "GPT-2"):
        try:
            model = _converted(arch, mechanism)
        except ValueError as err:
            assert any(why in str(err) for why in ("cannot be initialised from softmax",
                                                   "has no RoPE option")), err
            continue
        prompt = _prompt(4)
        cached = model.generate(prompt, max_new_tokens=4, use_cache=True, **GREEDY)
        plain = model.generate(prompt, max_new_tokens=4, use_cache=False, **GREEDY)
        assert torch.equal(cached, plain), (arch, mechanism)
        return


@pytest.mark.parametrize("mechanism", [
    "linear", pytest.param("softmax", marks=pytest.mark.slow),
    pytest.param("hedgehog", marks=pytest.mark.slow)])
def test_a_forward_continued_from_its_cache_equals_the_full_forward(mechanism):
    """By hand: a padded batch (a full row, a right-padded and a left-padded one) run in two
    chunks through the cache (6 tokens, then 4 at once) gives the full forward's logits; the
    cached tokens' padding stays in the state."""
    ids, mask = inputs()
    model = _converted("Llama", mechanism)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        first = model(input_ids=ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        assert first.cache.get_seq_length() == 6
        rest = model(input_ids=ids[:, 6:], attention_mask=mask, cache=first.cache,
                     use_cache=True)
    got = torch.cat((first.logits, rest.logits), dim=1)
    real = mask.bool()
    assert_close(got[real], full[real], roundings=ROUNDINGS, msg=mechanism)
    layer = rest.cache.layers[0]
    assert layer.state.position == ids.shape[1]
    assert torch.equal(layer.padding, mask.bool())


# --------------------------------------------------------------------------- beam search
@contextmanager
def _reorders() -> Iterator[list[torch.Tensor]]:
    """The beam indices every converted layer's cache entry is reordered by."""
    seen: list[torch.Tensor] = []
    original = StateCacheLayer.reorder_cache

    def record(self, beam_idx):
        seen.append(beam_idx.clone())
        original(self, beam_idx)

    StateCacheLayer.reorder_cache = record  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        StateCacheLayer.reorder_cache = original  # type: ignore[method-assign]


def _check_beam_search(arch: str, mechanism: str, ids: torch.Tensor,
                       mask: torch.Tensor | None = None, returned: int = 1) -> None:
    """Beam search (3 beams, ``returned`` sequences per prompt) with the cache gives the
    sequences and scores of the full recomputation; the beams were reordered on the way
    (some beam index is not the identity), so the states followed them."""
    model = _converted(arch, mechanism)
    options = dict(attention_mask=mask, num_beams=3, num_return_sequences=returned,
                   max_new_tokens=8, output_scores=True, return_dict_in_generate=True,
                   **GREEDY)
    with _reorders() as reorders:
        cached = model.generate(ids, use_cache=True, **options)
    plain = model.generate(ids, use_cache=False, **options)
    layers = len(conv.converted_modules(model))
    new = cached.sequences.shape[1] - ids.shape[1]
    assert len(reorders) == new * layers  # every layer after each step
    rows = torch.arange(ids.shape[0] * 3)
    assert any(not torch.equal(index, rows) for index in reorders), "never reordered"
    assert cached.sequences.shape[0] == ids.shape[0] * returned
    assert torch.equal(cached.sequences, plain.sequences), (arch, mechanism)
    assert_close(cached.sequences_scores, plain.sequences_scores, roundings=ROUNDINGS,
                 msg=f"{mechanism} on {arch}")
    assert cached.cache.layers[0].state.batch_size == ids.shape[0] * 3


BEAMS = [(arch, mechanism) for arch in ("GPT-2", "Llama")
         for mechanism in ("softmax", "hedgehog", "gated")]


@pytest.mark.parametrize("arch, mechanism", BEAMS)
def test_beam_search_with_the_cache_equals_without(arch, mechanism):
    _check_beam_search(arch, mechanism, _prompt(5))


@pytest.mark.parametrize("arch, mechanism", [
    pytest.param(*case, marks=[] if case in (("GPT-2", "softmax"), ("Llama", "hedgehog"))
                 else pytest.mark.slow)
    for case in BEAMS])
def test_beam_search_returns_two_sequences_per_prompt_of_a_batch(arch, mechanism):
    """Two prompts, 3 beams, 2 sequences returned for each; on GPT-2 (positions from the
    mask) the second prompt is left-padded, and each beam keeps its row's padding."""
    ids, mask = _prompt(6, batch=2).clone(), None
    if arch == "GPT-2":
        ids[1, :2] = 0
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
    _check_beam_search(arch, mechanism, ids, mask, returned=2)


@pytest.mark.parametrize("operation, argument, rows", [
    ("reorder_cache", torch.tensor([2, 0, 1]), [2, 0, 1]),
    ("batch_select_indices", torch.tensor([2, 0, 2]), [2, 0, 2]),
    ("batch_select_indices", torch.tensor([1]), [1]),
    ("batch_repeat_interleave", 2, [0, 0, 1, 1, 2, 2])])
def test_the_cache_selects_its_sequences_with_their_padding(operation, argument, rows):
    """By hand, on a padded batch (a full row, a right-padded and a left-padded one): 6
    tokens through the cache, its sequences reordered, selected or repeated, then the last 4
    tokens of those rows give their full forward's logits; the cached padding follows the
    rows (a padding left as it was is refused by the mask check, or pads the wrong rows)."""
    ids, mask = inputs()
    model = _converted("Llama", "linear")
    index = torch.tensor(rows)
    with torch.no_grad():
        first = model(input_ids=ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        getattr(first.cache, operation)(argument)
        layer = first.cache.layers[0]
        assert layer.state.batch_size == len(rows)
        assert torch.equal(layer.padding, mask[index, :6].bool())
        rest = model(input_ids=ids[index, 6:], attention_mask=mask[index], cache=first.cache,
                     use_cache=True)
        full = model(input_ids=ids[index], attention_mask=mask[index], use_cache=False).logits
    real = mask[index, 6:].bool()
    assert_close(rest.logits[real], full[:, 6:][real], roundings=ROUNDINGS, msg=operation)


def test_batch_operations_before_the_state_and_bad_indices():
    """Before the first call there is nothing to select (as for an empty DynamicLayer); a
    bad index or repeat count is refused and leaves the cache as it was."""
    empty = StateCacheLayer()
    empty.reorder_cache(torch.tensor([0, 0]))
    empty.batch_select_indices(torch.tensor([1]))
    empty.batch_repeat_interleave(3)
    empty.crop(0)
    assert empty.state is None and empty.get_seq_length() == 0
    model = _converted("GPT-2", "softmax")
    ids, mask = inputs()
    cache = model(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True).cache
    layer = cache.layers[0]
    with pytest.raises(ValueError, match=r"selects row 3 of a state of 3 sequences"):
        cache.reorder_cache(torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="non-empty 1-D integer index"):
        cache.batch_select_indices(torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="non-empty 1-D integer index, got an empty one"):
        cache.batch_select_indices([])
    with pytest.raises(ValueError, match=r"repeats must be an int >= 1, got 0"):
        cache.batch_repeat_interleave(0)
    assert layer.state.batch_size == 3 and layer.padding.shape == (3, 4)


# ------------------------------------------------------------------------------- padding
def test_left_padded_batches_generate_each_row_as_alone_on_gpt2():
    """GPT-2 (learned positions, which the model computes from the mask): a left-padded batch
    generates, cached, the tokens of the uncached batch and of each row alone."""
    model = _converted("GPT-2", "softmax")
    long, short = _prompt(7)[0], _prompt(4)[0]
    ids = torch.stack((long, torch.cat((torch.zeros(3, dtype=torch.long), short))))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    new = 4
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=new, use_cache=True,
                            **GREEDY)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=new, use_cache=False,
                           **GREEDY)
    assert torch.equal(cached, plain)
    alone = model.generate(short[None], max_new_tokens=new, use_cache=True, **GREEDY)
    assert torch.equal(cached[1, -new:], alone[0, -new:])


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", ["linear", "hedgehog", "sigmoid"])
def test_left_padding_keeps_padded_tokens_out_of_every_state(mechanism):
    """The per-step logits of a left-padded row equal the row's own, alone (the padded
    tokens never enter a recurrent summary)."""
    model = _converted("GPT-2", mechanism)
    short = _prompt(4)[0]
    ids = torch.stack((_prompt(7)[0], torch.cat((torch.zeros(3, dtype=torch.long), short))))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    options = dict(max_new_tokens=4, use_cache=True, output_logits=True,
                   return_dict_in_generate=True, **GREEDY)
    batch = model.generate(ids, attention_mask=mask, **options)
    alone = model.generate(short[None], **options)
    assert_close(torch.stack(batch.logits, 1)[1], torch.stack(alone.logits, 1)[0],
                 roundings=ROUNDINGS)


# ------------------------------------------------------------------------------ refusals
def test_a_mechanism_that_cannot_decode_refuses_the_cache_and_generates_without():
    """Sparsifiner (decode=False): convert turns generate's cache off; asking for one names
    the model class and the mechanism; generation without it works as before."""
    assert not al.info("sparsifiner").decode
    model = _converted("Llama", "sparsifiner")
    assert model.generation_config.use_cache is False and model.config.use_cache is False
    prompt = _prompt(5)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM \(llama\) -> sparsifiner: "
                                         r"sparsifiner cannot decode .*use_cache=False"):
        model.generate(prompt, max_new_tokens=2, use_cache=True, **GREEDY)
    default = model.generate(prompt, max_new_tokens=3, **GREEDY)
    assert torch.equal(default, model.generate(prompt, max_new_tokens=3, use_cache=False,
                                               **GREEDY))


def test_convert_keeps_the_models_generation_use_cache():
    model = build("GPT-2")
    model.generation_config.use_cache = False
    convert(model, "softmax")
    assert model.generation_config.use_cache is False and model.config.use_cache is False


def test_a_sliding_window_overrun_through_the_cache_is_refused():
    """Mistral (window 12): up to 12 tokens generate with the cache; a step whose cached and
    new tokens pass the window is refused, as the full recomputation is."""
    model = _converted("Mistral", "softmax")
    prompt = _prompt(8)
    fits = model.generate(prompt, max_new_tokens=WINDOW - 8 + 1, use_cache=True, **GREEDY)
    assert fits.shape[1] == WINDOW + 1  # 12 tokens fed, the 13th generated
    with pytest.raises(ValueError, match=rf"sliding window of {WINDOW} keys.*{WINDOW} cached "
                                         r"\+ 1 new"):
        model.generate(prompt, max_new_tokens=WINDOW - 8 + 2, use_cache=True, **GREEDY)
    with pytest.raises(ValueError, match=rf"sliding window of {WINDOW} keys"):
        model.generate(prompt, max_new_tokens=WINDOW - 8 + 2, use_cache=False, **GREEDY)


def test_what_a_state_cannot_do_is_refused():
    import transformers

    model = _converted("Llama", "linear")
    prompt = _prompt(4)
    # assisted decoding (here prompt lookup) crops rejected draft tokens: generate itself
    # refuses a cache whose layers are not croppable, after the prefill
    repetitive = prompt.repeat(1, 3)
    with pytest.raises(ValueError, match="a cache that can be cropped"):
        model.generate(repetitive, max_new_tokens=3, prompt_lookup_num_tokens=2,
                       use_cache=True, **GREEDY)
    static = transformers.StaticCache(config=model.config, max_cache_len=16)
    with pytest.raises(ValueError, match=r"keeps its attnlab state in a DynamicCache .*, got "
                                         r"StaticCache"):
        model(input_ids=prompt, cache=static, use_cache=True)
    out = model(input_ids=prompt, use_cache=True)
    with pytest.raises(ValueError, match="cropping 1 tokens"):
        out.cache.crop(-1)
    other = _converted("Llama", "linear")  # a cache holds one model's states
    with pytest.raises(ValueError, match="made by another 'linear' module"):
        other(input_ids=prompt[:, :1], cache=out.cache, use_cache=True)


def test_a_mask_that_repads_the_cached_tokens_is_refused():
    model = _converted("GPT-2", "softmax")
    ids, mask = inputs()
    out = model(input_ids=ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
    changed = mask.clone()
    changed[0, 0] = 0  # a cached real token now padding
    with pytest.raises(ValueError, match="not key padding plus the causal rule"):
        model(input_ids=ids[:, 6:], attention_mask=changed, cache=out.cache)
    with pytest.raises(ValueError, match="padding of the 6 cached tokens other than theirs"):
        model(input_ids=ids[:, 6:], cache=out.cache)  # no mask: the cached padding is lost


def test_key_padding_with_cached_tokens():
    """The (B, 1, L, past + L) masks transformers builds for new tokens after a cache: the
    padding of every key, checked against the cached tokens' padding."""
    past, length = 3, 2
    cached = torch.tensor([[False, True, True]])
    keep = torch.cat((cached, torch.tensor([[True, True]])), dim=1)
    rule = torch.ones(length, past + length, dtype=torch.bool).tril(past)
    mask = (rule & keep[:, None, :]).unsqueeze(1)
    found = conv._key_padding(mask, 1, length, True, None, "x", past=past, cached=cached)
    assert torch.equal(found, keep)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert torch.equal(conv._key_padding(additive, 1, length, True, None, "x", past=past,
                                         cached=cached), keep)
    assert torch.equal(conv._key_padding(keep.long(), 1, length, True, None, "x", past=past,
                                         cached=cached), keep)
    with pytest.raises(ValueError, match="not key padding plus the causal rule"):
        conv._key_padding(mask, 1, length, True, None, "x", past=past, cached=None)
    with pytest.raises(ValueError, match="pads the 3 cached tokens otherwise"):
        conv._key_padding(torch.ones(1, past + length), 1, length, True, None, "x",
                          past=past, cached=cached)
    with pytest.raises(ValueError, match="the cache holds padded tokens but no attention mask"):
        conv._key_padding(None, 1, length, True, None, "x", past=past, cached=cached)
    assert conv._key_padding(None, 1, length, True, None, "x", past=past, cached=None) is None
    with pytest.raises(ValueError, match=r"\(B, 5\) or \(B, 1, 2, 5\)"):
        conv._key_padding(mask[..., 1:], 1, length, True, None, "x", past=past, cached=cached)


def test_a_plain_forward_builds_no_state():
    """``config.use_cache`` is False after convert: ``model(ids)`` runs the full forward (no
    state, as before), so captures of every key's weights keep working."""
    model = _converted("Qwen2", "linear")
    with _seen(model) as calls:
        out = model(input_ids=_prompt(5))
    assert calls == [(5, False)] and out.cache is None
