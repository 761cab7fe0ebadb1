"""Whole groups as processes: one spawned member per core, shards on disk, a real gloo data
plane; failures name the member and leave no process behind."""

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeswarm.bench.tp_runner import (
    CollectiveJob,
    DecodeJob,
    EncodeJob,
    GroupOptions,
    run_collectives,
    run_group,
    write_shards,
)
from edgeswarm.models.tp.llama import llama_shape, reference_generation
from edgeswarm.models.tp.split import split_layers
from edgeswarm.models.zoo.llama import LlamaConfig, LlamaForCausalLM
from edgeswarm.placement.errors import DeviceLost, InvalidInput, ModelFileError

CONFIG = LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=64, num_layers=2,
                     num_heads=6, num_kv_heads=2, context_length=64)
FAST = GroupOptions(repeats=2, op_timeout_s=30.0, timeout_s=120.0)


@pytest.fixture(autouse=True)
def no_leaked_processes():
    yield
    deadline = time.monotonic() + 5.0
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not multiprocessing.active_children(), "member processes outlived the test"


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG).eval()


def shards(model: LlamaForCausalLM, size: int, directory: Path) -> list[Path]:
    split = split_layers(llama_shape(CONFIG), [1.0] * size, granule=8)
    return [path for path, _ in write_shards("llama", model, split, directory)]


def job(model: LlamaForCausalLM, new_tokens: int = 5) -> tuple[DecodeJob, tuple]:
    prompt = torch.randint(0, CONFIG.vocab_size, (1, 12),
                           generator=torch.Generator().manual_seed(3))
    reference = reference_generation(model, prompt, new_tokens, 2)
    tokens = tuple(tuple(r) for r in reference[2].tolist())
    return DecodeJob(tuple(tuple(r) for r in prompt.tolist()), new_tokens, tokens, 2), reference


def test_a_two_member_group_matches_one_device(model, tmp_path):
    decode, (logits, decoded, tokens) = job(model)
    result = run_group(shards(model, 2, tmp_path), decode, FAST)
    assert result.size == 2
    full = np.concatenate([m.outputs["prefill"] for m in result.members], axis=-1)
    assert np.abs(full - logits.numpy()).max() < 1e-4
    steps = np.concatenate([m.outputs["decode"] for m in result.members], axis=-1)
    assert np.abs(steps - torch.stack(decoded).numpy()).max() < 1e-4
    for m in result.members:
        assert m.tokens == tokens.tolist()
        assert len(m.times_s) == 2 and all(len(s) == 4 for s in m.step_s)
        assert m.peak_rss_bytes > m.base_rss_bytes > 0
        assert 0 < m.param_bytes == m.resident_param_bytes
        if hasattr(os, "sched_setaffinity"):
            assert m.core == m.rank % os.cpu_count()
    assert result.best_time_s() > 0 and result.best_step_s() > 0
    prefill_ms, decode_ms = result.collective_ms()
    assert prefill_ms > 0 and decode_ms > 0
    assert {"direct", "star", "gloo", "star_per_byte"} <= set(result.members[0].overhead_s)


def test_the_group_of_one_runs_the_same_program_without_a_plane(model, tmp_path):
    decode, (logits, _, tokens) = job(model)
    result = run_group(shards(model, 1, tmp_path), decode,
                       GroupOptions(repeats=1, window=1, timeout_s=120.0))
    (m,) = result.members
    assert np.abs(m.outputs["prefill"] - logits.numpy()).max() < 1e-4
    assert m.tokens == tokens.tolist()
    assert m.resident_param_bytes < m.param_bytes  # a window of one layer
    assert m.algorithms == {} and result.collective_ms() == (0.0, 0.0)


def test_a_member_that_fails_is_named(model, tmp_path):
    dirs = shards(model, 2, tmp_path)
    (dirs[1] / "layer_001.safetensors").unlink()
    decode, _ = job(model)
    with pytest.raises(ModelFileError, match=r"member 1 failed: .*layer_001"):
        run_group(dirs, decode, FAST)


def test_a_member_killed_mid_run_is_device_lost_not_a_hang(model, tmp_path):
    decode, _ = job(model, new_tokens=40)
    dirs = shards(model, 2, tmp_path)
    options = GroupOptions(repeats=200, check=False, op_timeout_s=30.0, timeout_s=120.0)
    killed: list[int] = []

    def kill_one() -> None:
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            children = [p for p in multiprocessing.active_children()
                        if p.name == "edgeswarm-tp-member-1"]
            if children:
                time.sleep(4.0)  # past start-up, into the repeats
                os.kill(children[0].pid, signal.SIGKILL)
                killed.append(children[0].pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one)
    killer.start()
    start = time.monotonic()
    try:
        with pytest.raises(DeviceLost, match=r"member 1 .* killed by signal 9"):
            run_group(dirs, decode, options)
    finally:
        killer.join()
    assert killed
    assert time.monotonic() - start < options.op_timeout_s + 20


def test_a_run_past_its_time_is_stopped(model, tmp_path):
    decode, _ = job(model)
    with pytest.raises(DeviceLost, match="did not finish within"):
        run_group(shards(model, 2, tmp_path), decode, GroupOptions(timeout_s=0.5))


def test_all_reduces_alone_are_timed_per_algorithm():
    result = run_collectives(2, CollectiveJob(((1, 8),), ("star", "direct"), rounds=3),
                             FAST)
    for m in result.members:
        assert set(m.allreduce_ms) == {"star 1x8", "direct 1x8"}
        assert all(v > 0 for v in m.allreduce_ms.values())


def test_bad_requests_are_refused(model, tmp_path):
    decode, _ = job(model)
    with pytest.raises(InvalidInput, match="at least one"):
        run_group([], decode)
    with pytest.raises(InvalidInput, match="unknown all-reduce"):
        run_group([tmp_path], decode, GroupOptions(algorithm="tree"))
    with pytest.raises(InvalidInput, match="repeats"):
        run_group([tmp_path], decode, GroupOptions(repeats=0))
    with pytest.raises(InvalidInput, match="at least 2"):
        run_collectives(1, CollectiveJob(((1,),), ("star",)))
    with pytest.raises(InvalidInput, match="member program"):
        write_shards("gpt", model, split_layers(llama_shape(CONFIG), [1.0], 8), tmp_path)
    with pytest.raises(InvalidInput, match="BertEncoder"):
        write_shards("bert", model, split_layers(llama_shape(CONFIG), [1.0], 8), tmp_path)


@pytest.mark.slow
def test_smollm2_on_two_processes_matches_the_zoo_model(tmp_path):
    """The real model: 2 members, 32-token prompt, 4 greedy tokens, logits within 1e-4."""
    from edgeswarm.models.zoo import smollm2

    lm = smollm2.load_lm()
    heldout, _ = smollm2.load_paragraphs()
    prompt = torch.tensor([lm.encode(heldout[0])[:32]])
    logits, decoded, tokens = reference_generation(lm.module, prompt, 4, 2)
    split = split_layers(llama_shape(lm.module.config), [1.0, 1.0])
    dirs = [p for p, _ in write_shards("llama", lm.module, split, tmp_path)]
    decode = DecodeJob(tuple(tuple(r) for r in prompt.tolist()), 4,
                       tuple(tuple(r) for r in tokens.tolist()), 2)
    result = run_group(dirs, decode, GroupOptions(repeats=1, timeout_s=300.0))
    full = np.concatenate([m.outputs["prefill"] for m in result.members], axis=-1)
    assert np.abs(full - logits.numpy()).max() < 1e-4
    steps = np.concatenate([m.outputs["decode"] for m in result.members], axis=-1)
    assert np.abs(steps - torch.stack(decoded).numpy()).max() < 1e-4
    assert result.members[0].tokens == tokens.tolist()
    full_bytes = sum(p.numel() * 4 for p in lm.module.parameters())
    assert max(m.param_bytes for m in result.members) <= 0.55 * full_bytes


def test_an_encoder_job_needs_a_bert_shard(model, tmp_path):
    encode = EncodeJob(((1, 2, 3),), ((1, 1, 1),))
    with pytest.raises(ModelFileError, match="not 'bert'"):
        run_group(shards(model, 1, tmp_path), encode, GroupOptions(repeats=1, timeout_s=120.0))
