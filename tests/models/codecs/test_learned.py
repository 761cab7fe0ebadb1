"""The learned codec: bit-exact entropy coding, accuracy as the bench reports it, bad bytes,
artifacts, and a tiny training run whose losses fall."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeswarm.bench import compression as bench
from edgeswarm.models.codecs import wire
from edgeswarm.models.codecs.e2e import split_with_codec
from edgeswarm.models.codecs.learned import LearnedCodec, load_artifact
from edgeswarm.models.codecs.train import (
    LearnedRecipe,
    cut,
    scene_training_split,
    teacher_data,
    train,
)
from edgeswarm.models.zoo import ZooModel
from edgeswarm.models.zoo.scene import to_input
from edgeswarm.models.zoo.training import deterministic
from edgeswarm.placement.errors import InvalidInput, ModelFileError

#: The split model with the codec, run through real bytes in batches, must score what the
#: bench scores coding one sample at a time, up to symbols that round the other way when
#: the encoder runs on a batch (a handful of 1,000 samples at most).
ACCURACY_TOLERANCE = 0.005
#: The default β measured 1.1 points below the teacher on one machine and 2.2 on another (an
#: AMD EPYC without AVX-512: training is deterministic per machine, not across CPUs). The
#: 1-point target is the bench's, at a lower β; 3 points here fail a broken codec or tail.
TEACHER_TOLERANCE = 0.03


def _features(scene: ZooModel, learned: LearnedCodec, n: int) -> torch.Tensor:
    cs = split_with_codec(scene.module, scene.example_inputs, learned.split, learned)
    with torch.inference_mode():
        (h,) = cs.head(scene.heldout.inputs[0][:n])
    return h


@pytest.mark.slow
def test_bytes_decode_to_exactly_the_quantized_latent(scene, learned):
    h = _features(scene, learned, 64)
    payload = learned.encode(h.numpy())
    latent = learned.decode_latent(payload)
    with torch.inference_mode():
        expected = learned.bottleneck.quantized(h)
        assert torch.equal(latent, expected)  # bit-exact, not close
        decoded = learned.bottleneck.decoder(expected).numpy()
    assert np.array_equal(learned.decode(payload), decoded)
    # one sample per message carries the same symbols
    one = learned.decode_latent(learned.encode(h[5:6].numpy()))
    assert torch.equal(one, expected[5:6])
    assert len(payload) < 64 * h[0].numel() * 4 / 20  # and it is small


@pytest.mark.slow
def test_split_accuracy_over_real_bytes_matches_the_bench(scene, learned, one_thread):
    cs = split_with_codec(scene.module, scene.example_inputs, learned.split, learned)
    inputs, labels = scene.heldout.inputs[0], scene.heldout.labels
    assert labels is not None
    predictions = []
    for start in range(0, len(labels), 100):
        payload = cs.send(inputs[start:start + 100])  # the bytes that cross the link
        predictions.append(cs.receive(payload).argmax(1))
    e2e = float((torch.cat(predictions) == labels).float().mean())
    with torch.inference_mode():
        (features,) = cs.head(inputs)
    point = bench.feature_point(learned, features.numpy(), cs.tail, labels.numpy(), timed=5)
    assert point["codec"] == "learned" and point["setting"] == learned.setting
    assert abs(e2e - point["accuracy"]) <= ACCURACY_TOLERANCE
    teacher = bench.accuracy(lambda x: scene.module(x), inputs.numpy(), labels.numpy())
    assert e2e >= teacher - TEACHER_TOLERANCE


@pytest.mark.slow
def test_corrupt_or_foreign_bytes_raise_naming_the_codec(scene, learned):
    payload = learned.encode(_features(scene, learned, 2).numpy())
    name = f"codec 'learned:{learned.setting}'"
    for bad in (payload[:-3], payload + b"\x01", payload[:4]):
        with pytest.raises(InvalidInput, match=name):
            learned.decode(bad)
    foreign = bytearray(payload)
    foreign[2] ^= 0xFF  # the artifact fingerprint
    with pytest.raises(InvalidInput, match="another trained codec"):
        learned.decode(bytes(foreign))
    h, w = learned.shape.latent_hw
    header = wire.header("learned") + learned.fingerprint + wire.varint(2)
    wrong = header + wire.varint(h * 2) + wire.varint(w) + payload[len(header) + 2:]
    with pytest.raises(InvalidInput, match="latent is"):
        learned.decode(wrong)
    with pytest.raises(InvalidInput, match="codes activations of shape"):
        learned.encode(np.zeros((1, 3, 8, 8), dtype=np.float32))


@pytest.mark.slow
def test_artifacts_reload_and_refuse_tampering(scene, learned, tmp_path):
    stem = tmp_path / "codec-b0.0003-abc"  # a β with a dot must not become a suffix
    weights, doc = learned.save(stem)
    again = load_artifact(stem)
    x = _features(scene, learned, 3).numpy()
    assert again.encode(x) == learned.encode(x)
    assert again.full_name == learned.full_name and again.split == learned.split
    meta = json.loads(doc.read_text())
    assert meta["format"] == "edgeswarm.codec.learned/1" and meta["sha256"] == learned.sha256
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    with pytest.raises(ModelFileError, match="sha256"):
        load_artifact(stem)
    doc.write_text(json.dumps({**meta, "format": "pickle"}))
    with pytest.raises(ModelFileError, match="format"):
        load_artifact(stem)


def test_tiny_training_run_lowers_both_losses(scene):
    recipe = LearnedRecipe(beta=1e-4, train_rows=128, stage1_epochs=4, stage2_epochs=3,
                           batch_size=32, threads=1)
    with deterministic(recipe.seed, recipe.threads):
        c = cut(scene, recipe.split)
        images, labels = scene_training_split(recipe.train_rows)
        data = teacher_data(scene, c, images, labels, to_input)
        _, tail, meta = train(recipe, scene, c, data)
    history = meta["history"]
    assert isinstance(history, dict)
    assert history["stage1_loss"][-1] < 0.9 * history["stage1_loss"][0]
    assert history["stage2_loss"][-1] < history["stage2_loss"][0]
    assert set(tail) == {k for k in c.next.state_dict()} | {k for k in c.rest.state_dict()}
    assert meta["split"] == "conv1" and meta["next_task"] == "conv2"


def test_cut_needs_two_tasks_after_the_split(scene):
    with pytest.raises(InvalidInput, match="cannot cut scene-cnn after 'conv3'"):
        cut(scene, "conv3")
    with pytest.raises(InvalidInput, match="beta"):
        LearnedRecipe(beta=0.0)
