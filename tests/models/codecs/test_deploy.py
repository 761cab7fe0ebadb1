"""Codecs as a deployment ships them: loaded by name, a learned one from its two files
(under a device cache's hash names), its restriction to its edge, its tuned stages."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from edgeswarm.models import codecs
from edgeswarm.models.codecs.deploy import artifact_files, load
from edgeswarm.models.codecs.e2e import split_with_codec
from edgeswarm.models.codecs.simple import Int8Codec, NoneCodec
from edgeswarm.models.graph import trace
from edgeswarm.models.partition import partition
from edgeswarm.placement.errors import InvalidInput, ModelFileError
from edgeswarm.placement.plan import Plan


def test_plain_codecs_load_by_name_and_nothing_else_does():
    assert isinstance(load("int8"), Int8Codec) and isinstance(load("none"), NoneCodec)
    assert artifact_files(load("fp16")) == ()
    with pytest.raises(InvalidInput, match="unknown codec 'zip'"):
        load("zip")
    with pytest.raises(InvalidInput, match="'jpeg:50' codes input images"):
        load("jpeg:50")
    with pytest.raises(InvalidInput, match="'int8' takes no artifact files"):
        load("int8", ["x.json"])
    with pytest.raises(InvalidInput, match="needs its two artifact files"):
        load("learned:1e-05")  # a device never trains one


@pytest.fixture
def hashed(learned, tmp_path):
    """The learned codec's two files as a device's artifact cache names them."""
    assert learned.files is not None
    weights, doc = learned.files
    out = (tmp_path / f"{'a' * 64}.safetensors", tmp_path / f"{'b' * 64}.json")
    shutil.copyfile(weights, out[0])
    shutil.copyfile(doc, out[1])
    return out


@pytest.mark.slow
def test_a_learned_codec_loads_from_its_files_and_decodes_the_senders_bytes(learned, scene,
                                                                          hashed):
    assert artifact_files(learned) == learned.files
    device = load(learned.full_name, [hashed[1], hashed[0]])  # any order
    assert device.full_name == learned.full_name
    cs = split_with_codec(scene.module, scene.example_inputs, "conv1", codecs.get("none"))
    with torch.inference_mode():
        h = cs.head(scene.heldout.inputs[0][:4])[0].numpy()
    payload = learned.encode(h)
    assert device.encode(h) == payload
    assert np.array_equal(device.decode(payload), learned.decode(payload))
    assert load("learned", hashed).full_name == learned.full_name  # no β: the artifact's
    with pytest.raises(InvalidInput, match="the artifact holds 'learned:1e-05'"):
        load("learned:0.0003", hashed)


@pytest.mark.slow
def test_corrupt_learned_files_are_refused_naming_them(learned, hashed):
    weights, doc = hashed
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=rf"{weights.name} \+ {doc.name}.*sha256"):
        load(learned.full_name, hashed)
    doc.write_text("{not json")
    with pytest.raises(ModelFileError, match="cannot be read"):
        load(learned.full_name, hashed)


@pytest.mark.slow
def test_the_learned_spec_is_valid_on_its_edge_only(learned):
    assert learned.edge == ("conv1", "conv2")
    spec = learned.spec(1e11)
    assert spec.edges == frozenset({("conv1", "conv2")}) and spec.name == learned.full_name
    table = codecs.codec_table([learned, codecs.get("int8")], 1e11)
    assert table[learned.full_name].edges == spec.edges and table["int8"].edges is None
    assert "bottleneck" not in table  # the measured codec replaces the placeholder


@pytest.mark.slow
def test_tuned_stages_after_the_cut_run_like_the_tuned_tail(learned, scene):
    traced = trace(scene.module, scene.example_inputs)
    ids = [t.id for t in traced.graph.tasks]
    where = {t: ("a" if i <= ids.index("conv1") else "b" if t == "conv2" else "c")
             for i, t in enumerate(ids)}
    part = partition(scene.module, scene.example_inputs,
                     Plan({t: (d,) for t, d in where.items()}), traced)
    assert [s.tasks[-1] for s in part.stages] == ["conv1", "conv2", "fc"]
    tuned = [learned.tune_stage(s.module) for s in part.stages[1:]]
    x = scene.heldout.inputs[0][:8]
    reference = split_with_codec(scene.module, scene.example_inputs, "conv1", learned).run(x)
    with torch.inference_mode():
        h = torch.from_numpy(learned.decode(learned.encode(part.stages[0].module(x)[0].numpy())))
        got = tuned[1](*tuned[0](h))[0]
        untuned = part.stages[2].module(*part.stages[1].module(h))[0]
    assert torch.allclose(got, reference, atol=1e-5)
    assert not torch.allclose(untuned, reference, atol=1e-2)  # the tuning matters
    assert part.stages[1].module is not tuned[0]  # the model's own stage is left alone
    with pytest.raises(InvalidInput, match="not part of scene-cnn's tail after 'conv1'"):
        learned.tune_stage(part.stages[0].module)
