"""A tensor-parallel BERT group against the one-device encoder: tiny random weights, real
gloo data planes between members (threads), shards through the store."""

from pathlib import Path

import pytest
import torch

from edgeswarm.models.tp.bert import BertMember, bert_shape, slice_bert
from edgeswarm.models.tp.collective import Collective, Solo
from edgeswarm.models.tp.llama import shard_sizes
from edgeswarm.models.tp.split import split_layers
from edgeswarm.models.tp.store import open_store, write_shard
from edgeswarm.models.zoo.bert import BertConfig, BertEncoder
from edgeswarm.placement.errors import InvalidInput, ModelFileError

CONFIG = BertConfig(vocab_size=97, hidden_size=48, num_layers=2, num_heads=4,
                    intermediate_size=64, max_positions=32, type_vocab_size=2,
                    layer_norm_eps=1e-12)


@pytest.fixture(scope="module")
def encoder() -> BertEncoder:
    torch.manual_seed(0)
    return BertEncoder(CONFIG).eval()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, CONFIG.vocab_size, (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0  # padding must not leak into the real tokens
    return ids, mask


def write(encoder: BertEncoder, speeds: list[float], directory: Path) -> list[Path]:
    split = split_layers(bert_shape(encoder.config), speeds, granule=8)
    dirs = []
    for rank, shard in enumerate(slice_bert(encoder, split)):
        write_shard(directory / f"m{rank}", shard.layers, shard.extra, shard.meta)
        dirs.append(directory / f"m{rank}")
    return dirs


@pytest.mark.parametrize(("speeds", "window", "pieces"), [
    ([1.0], None, 1), ([1.0], 1, 2), ([1.0, 1.0], None, 1), ([1.0, 1.0], None, 2),
    ([3.0, 1.0], 1, 3), ([3.0, 1.0], 2, 5), ([1.0] * 4, None, 2)])
def test_members_equal_the_one_device_encoder(encoder, batch, tmp_path, run_members, speeds,
                                              window, pieces):
    """Uneven heads, a window of layers, micro-batches taking turns (more pieces than rows:
    the empty ones are skipped)."""
    ids, mask = batch
    with torch.no_grad():
        want = encoder(ids, mask)
    dirs = write(encoder, speeds, tmp_path)

    def member(coll: Collective):
        store = open_store(dirs[coll.rank], window)
        try:
            m = BertMember(store, coll)
            first = m.forward(ids, mask, micro_batches=pieces)
            return first, m.forward(ids, mask, micro_batches=pieces), coll.stats.calls
        finally:
            coll.close()
            store.close()

    for first, second, calls in run_members(len(speeds), member):
        assert (first - want).abs().max() < 1e-5
        assert torch.equal(first, second)
        # per piece: the embedding, then one all-reduce per sub-block
        per_piece = 1 + 2 * CONFIG.num_layers
        assert calls == (0 if len(speeds) == 1 else 2 * min(pieces, 3) * per_piece)


def test_the_vocabulary_is_split_too(encoder):
    split = split_layers(bert_shape(CONFIG), [1.0, 1.0], granule=8)
    shards = slice_bert(encoder, split)
    full = sum(p.numel() * 4 for p in encoder.parameters())
    assert shards[0].extra["word"].shape[0] + shards[1].extra["word"].shape[0] \
        == CONFIG.vocab_size
    assert max(shard_sizes(shards)) < 0.6 * full  # norms, biases, positions: on both


def test_bad_inputs_and_shards_are_refused(encoder, tmp_path):
    (d,) = write(encoder, [1.0], tmp_path)
    store = open_store(d)
    try:
        member = BertMember(store, Solo())
        ids = torch.zeros(1, 4, dtype=torch.long)
        with pytest.raises(InvalidInput, match="must match"):
            member.forward(ids, torch.ones(1, 3, dtype=torch.long))
        with pytest.raises(InvalidInput, match="positions"):
            member.forward(torch.zeros(1, 40, dtype=torch.long),
                           torch.ones(1, 40, dtype=torch.long))
        with pytest.raises(InvalidInput, match="token ids"):
            member.forward(ids - 1, torch.ones(1, 4, dtype=torch.long))
        with pytest.raises(InvalidInput, match="micro_batches"):
            member.forward(ids, torch.ones(1, 4, dtype=torch.long), micro_batches=0)
    finally:
        store.close()
    from edgeswarm.models.tp.llama import LlamaMember

    store = open_store(d)
    try:
        with pytest.raises(ModelFileError, match="'bert' model, not 'llama'"):
            LlamaMember(store, Solo())
    finally:
        store.close()
