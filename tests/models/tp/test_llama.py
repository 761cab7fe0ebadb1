"""A tensor-parallel Llama group against the one-device model: tiny random weights, real
gloo data planes between members (threads), shards written and read through the store."""

from pathlib import Path

import pytest
import torch

from edgeswarm.models.tp.collective import Collective, Solo
from edgeswarm.models.tp.llama import (
    LlamaMember,
    llama_shape,
    member_checks,
    reference_generation,
    shard_sizes,
    slice_llama,
)
from edgeswarm.models.tp.split import split_layers
from edgeswarm.models.tp.store import open_store, write_shard
from edgeswarm.models.zoo.llama import LlamaConfig, LlamaForCausalLM
from edgeswarm.placement.errors import InvalidInput

CONFIG = LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=64, num_layers=2,
                     num_heads=6, num_kv_heads=2, context_length=128)
TOL = 1e-4


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG).eval()


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))


def write(model: LlamaForCausalLM, speeds: list[float], directory: Path) -> list[Path]:
    split = split_layers(llama_shape(model.config), speeds, granule=8)
    dirs = []
    for rank, shard in enumerate(slice_llama(model, split)):
        write_shard(directory / f"m{rank}", shard.layers, shard.extra, shard.meta)
        dirs.append(directory / f"m{rank}")
    return dirs


@pytest.mark.parametrize(("speeds", "chunks"), [([1.0], 1), ([1.0], 3), ([1.0, 1.0], 1),
                                                ([2.0, 1.0], 2), ([1.0, 1.0, 1.0], 3),
                                                ([1.0, 2.0, 1.0, 1.0], 9)])
def test_members_equal_the_one_device_model(model, prompt, tmp_path, run_members, speeds,
                                            chunks):
    """Prefill and decode logits (gathered on every member) and greedy tokens; uneven
    heads, kv heads shared by two members (3 and 4 members of 6 heads / 2 kv heads), the
    prompt in pieces that take turns (more pieces than tokens: the empty ones skipped)."""
    ref_logits, ref_decoded, ref_tokens = reference_generation(model, prompt, 6, 3)
    dirs = write(model, speeds, tmp_path)

    def member(coll: Collective):
        store = open_store(dirs[coll.rank])
        try:
            m = LlamaMember(store, coll)
            prefill, decoded = member_checks(m, prompt, ref_tokens, 3)
            chunked = m.prefill(prompt, chunks=chunks)
            assert (chunked - prefill).abs().max() < TOL
            return prefill, decoded, m.generate(prompt, 6, chunks).tokens, m.length
        finally:
            coll.close()
            store.close()

    for prefill, decoded, tokens, length in run_members(len(speeds), member):
        assert (prefill - ref_logits).abs().max() < TOL
        for got, want in zip(decoded, ref_decoded, strict=True):
            assert (got - want).abs().max() < TOL
        assert torch.equal(tokens, ref_tokens)
        assert length == prompt.shape[1] + 5  # the cache kept every token but the last


@pytest.mark.parametrize("algorithm", ["gloo", "direct", "auto"])
def test_every_all_reduce_algorithm_gives_the_same_tokens(model, prompt, tmp_path,
                                                          run_members, algorithm):
    _, _, ref_tokens = reference_generation(model, prompt, 4, 0)
    dirs = write(model, [1.0, 1.0], tmp_path)

    def member(coll: Collective):
        store = open_store(dirs[coll.rank])
        try:
            gen = LlamaMember(store, coll).generate(prompt, 4)
            return gen.tokens, gen.decode_collectives[0]
        finally:
            store.close()

    for tokens, calls in run_members(2, member, algorithm=algorithm):
        assert torch.equal(tokens, ref_tokens)
        # 2 all-reduces per layer and one fused greedy choice per token, nothing more
        assert calls == 3 * (2 * CONFIG.num_layers + 1)


def test_the_kv_cache_grows_past_its_first_allocation(model, tmp_path):
    """64 tokens are reserved at first; a longer generation doubles the cache in place."""
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    _, _, ref_tokens = reference_generation(model, prompt, 90, 0)
    (d,) = write(model, [1.0], tmp_path)
    with_window = open_store(d, window=1)
    try:
        member = LlamaMember(with_window, Solo())
        gen = member.generate(prompt, 90)
    finally:
        with_window.close()
    assert torch.equal(gen.tokens, ref_tokens)
    assert member.length == 5 + 89
    assert len(gen.step_s) == 89 and gen.ttft_s > 0


def test_each_member_holds_only_its_slice(model):
    full = sum(p.numel() * 4 for p in model.parameters())  # tied: the embedding once
    split = split_layers(llama_shape(CONFIG), [1.0, 1.0], granule=8)
    shards = slice_llama(model, split)
    sizes = shard_sizes(shards)
    a, b = split.members
    assert shards[0].extra["embed"].shape == (a.vocab[1] - a.vocab[0], CONFIG.hidden_size)
    assert shards[1].layers[0]["down"].shape == (CONFIG.hidden_size, b.mlp[1] - b.mlp[0])
    # no kv head duplicated at 2 members: the slices add up to the model (norms: both)
    norms = (2 * CONFIG.num_layers + 1) * CONFIG.hidden_size * 4
    assert sum(sizes) == full + norms
    assert max(sizes) < 0.55 * full


def test_a_member_refuses_a_shard_of_another_rank_or_bad_ids(model, tmp_path):
    dirs = write(model, [1.0, 1.0], tmp_path)
    store = open_store(dirs[1])
    try:
        with pytest.raises(InvalidInput, match="member 1 of 2"):
            LlamaMember(store, Solo())
    finally:
        store.close()
    (d,) = write(model, [1.0], tmp_path / "one")
    store = open_store(d)
    try:
        member = LlamaMember(store, Solo())
        with pytest.raises(InvalidInput, match="token ids"):
            member.prefill(torch.tensor([[0, CONFIG.vocab_size]]))
        with pytest.raises(InvalidInput, match="LongTensor"):
            member.prefill(torch.zeros(1, 3))
        with pytest.raises(InvalidInput, match="one token per sequence"):
            member.decode(torch.tensor([[1]]))
        with pytest.raises(InvalidInput, match="context length"):
            member.generate(torch.zeros(1, 120, dtype=torch.long), 20)
    finally:
        store.close()


def test_a_split_for_another_model_is_refused(model):
    other = split_layers(llama_shape(LlamaConfig(vocab_size=50, hidden_size=48,
                                                 intermediate_size=64, num_layers=2,
                                                 num_heads=6, num_kv_heads=2)), [1.0], 8)
    with pytest.raises(InvalidInput, match="split was made for"):
        slice_llama(model, other)
