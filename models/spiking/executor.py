"""Running a spiking network timestep by timestep, counting synaptic operations.

Per timestep and spike-driven layer, only the synapses of the neurons that spiked are
accumulated: the executor gathers the weight rows (linear) or kernel slices (conv) of
the spiking inputs and scatter-adds them into the outputs, additions only. A spike of
neuron ``i`` costs ``fanout[i]`` synaptic operations (SOPs), whichever path runs it.

Where spikes are dense, gathering costs more than it saves, so ``mode="auto"`` runs a
layer's timestep as a dense matrix product once the share of spiking inputs passes
``dense_above``. Both paths add the same integers (fixed point, see
:mod:`~edgeswarm.models.spiking.network`), so they agree bitwise: spikes, potentials,
outputs and SOP counts. Currents and potentials are float32 wherever every value they
can take is an integer below 2**24 (exact whatever order a kernel adds in), else float64.

The first layer sees the analog input: its current is computed once per inference
(``input_macs`` multiply-adds) and injected at every timestep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from edgeswarm.models.spiking.network import Flatten, MaxPool, SpikingNetwork, Synapse
from edgeswarm.placement.errors import InvalidInput

Mode = Literal["auto", "event", "dense"]
MODES: tuple[Mode, ...] = ("auto", "event", "dense")
#: In ``auto`` mode a layer's timestep runs dense once this share of its inputs spiked.
DENSE_ABOVE = 0.005


@dataclass(frozen=True)
class SpikeRun:
    """What one batch did, timestep by timestep (``T`` steps run at most, batch ``B``).

    ``logits[t]`` is the output after ``t + 1`` steps (the accumulated output current
    divided by the steps, in the ANN's logit units); a sample that exited early keeps its
    exit-step logits afterwards and adds no SOPs.
    """

    logits: torch.Tensor  # (T, B, classes) float64
    sops: torch.Tensor  # (T, B) float64: synaptic operations in each step
    steps: torch.Tensor  # (B,) int64: the steps each sample ran
    #: per spike-driven layer, spikes arriving at it (summed over steps and samples)
    spikes: dict[str, int]
    dense_steps: int  # layer-steps run by the dense path
    event_steps: int  # layer-steps run by the event-driven path

    @property
    def final(self) -> torch.Tensor:
        """The output each sample left with (B, classes)."""
        return self.logits[-1]


ExitRule = Callable[[torch.Tensor, int], torch.Tensor]
"""``(logits (B, classes), step) -> bool (B,)``: which samples may stop after ``step``."""


def simulate(net: SpikingNetwork, x: torch.Tensor, steps: int, mode: Mode = "auto",
             exit_rule: ExitRule | None = None, dense_above: float = DENSE_ABOVE) -> SpikeRun:
    """Run ``steps`` timesteps on the batch ``x`` (batch-first, ``net.input_shape``)."""
    if mode not in MODES:
        raise InvalidInput(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    if steps < 1:
        raise InvalidInput(f"steps must be >= 1, got {steps}")
    if tuple(x.shape[1:]) != net.input_shape:
        raise InvalidInput(f"input has per-sample shape {tuple(x.shape[1:])}, the network "
                           f"takes {net.input_shape}")
    with torch.inference_mode():
        return _Simulation(net, mode, dense_above).run(x, steps, exit_rule)


def simulate_batched(net: SpikingNetwork, x: torch.Tensor, steps: int, mode: Mode = "auto",
                     exit_rule: ExitRule | None = None, batch_size: int = 128) -> SpikeRun:
    """:func:`simulate` over ``x`` in batches of ``batch_size``, joined into one run."""
    if batch_size < 1:
        raise InvalidInput(f"batch_size must be >= 1, got {batch_size}")
    runs = [simulate(net, x[i:i + batch_size], steps, mode, exit_rule)
            for i in range(0, len(x), batch_size)] or [simulate(net, x, steps, mode, exit_rule)]
    spikes: dict[str, int] = {}
    for r in runs:
        for name, n in r.spikes.items():
            spikes[name] = spikes.get(name, 0) + n
    return SpikeRun(torch.cat([r.logits for r in runs], 1), torch.cat([r.sops for r in runs], 1),
                    torch.cat([r.steps for r in runs]), spikes,
                    sum(r.dense_steps for r in runs), sum(r.event_steps for r in runs))


class _Simulation:
    def __init__(self, net: SpikingNetwork, mode: Mode, dense_above: float) -> None:
        self.net = net
        self.mode = mode
        self.dense_above = dense_above
        self.spikes: dict[str, int] = {}
        self.dense_steps = 0
        self.event_steps = 0

    def run(self, x: torch.Tensor, steps: int, exit_rule: ExitRule | None) -> SpikeRun:
        net = self.net
        batch = x.shape[0]
        one = net.one
        a = x.detach().to(torch.float64)
        for route in net.prefix:
            a = _route_analog(route, a)
        first = net.ops[0]
        assert isinstance(first, Synapse)
        # the analog input's current, in fixed point, once per inference
        drive = torch.round(F.linear(a, first.weight, first.bias) if first.kind == "linear"
                            else F.conv2d(a, first.weight, first.bias, first.stride,
                                          first.padding))
        spike_dtype = net.current_dtype
        # |v| <= v_init + steps * (largest current): float32 holds it exactly below 2**24
        reach = net.v_init * one + steps * max(net.largest_membrane_current(),
                                               float(drive.abs().amax()) if drive.numel() else 0.0)
        v_dtype = torch.float32 if reach < 2.0 ** 24 else torch.float64
        drive = drive.to(v_dtype if first.spiking else torch.float64)
        # state per op: membrane potentials after each spiking synapse; per pool, the
        # spike count of every input and the largest count in every window
        state: dict[int, torch.Tensor] = {}
        peaks: dict[int, torch.Tensor] = {}
        for i, op in enumerate(net.ops):
            if isinstance(op, Synapse) and op.spiking:
                state[i] = torch.full((batch, *op.out_shape), round(net.v_init * one),
                                      dtype=v_dtype)
            elif isinstance(op, MaxPool):
                state[i] = torch.zeros((batch, *op.in_shape), dtype=spike_dtype)
                peaks[i] = torch.zeros((batch, *op.out_shape), dtype=spike_dtype)
        acc = torch.zeros(batch, net.output_size, dtype=torch.float64)
        logits = torch.zeros(steps, batch, net.output_size, dtype=torch.float64)
        sops = torch.zeros(steps, batch, dtype=torch.float64)
        ran = torch.full((batch,), steps, dtype=torch.int64)
        live = torch.arange(batch)  # rows of the original batch still running
        for t in range(steps):
            current = drive
            step_sops = torch.zeros(len(live), dtype=torch.float64)
            for i, op in enumerate(net.ops):
                if isinstance(op, Synapse):
                    if i > 0:
                        current, cost = self._synapse(op, current)
                        step_sops += cost
                    if op.spiking:
                        v = state[i]
                        v += current
                        current = (v >= one).to(spike_dtype)
                        v.sub_(current, alpha=one)  # reset by subtraction
                elif isinstance(op, MaxPool):
                    current = _pool_step(op, state[i], peaks[i], current)
                else:
                    current = current.flatten(1)
            acc += current.flatten(1)  # the output layer accumulates
            sops[t, live] = step_sops
            logits[t, live] = acc / ((t + 1) * one)
            if exit_rule is None or t == steps - 1:
                continue
            done = exit_rule(logits[t, live], t + 1)
            if bool(done.any()):
                gone = live[done]
                ran[gone] = t + 1
                logits[t + 1:, gone] = logits[t, gone]
                keep = ~done
                live = live[keep]
                if len(live) == 0:
                    break
                drive, acc = drive[keep], acc[keep]
                state = {k: s[keep] for k, s in state.items()}
                peaks = {k: s[keep] for k, s in peaks.items()}
        return SpikeRun(logits, sops, ran, self.spikes, self.dense_steps, self.event_steps)

    def _synapse(self, op: Synapse, spikes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Output current of one spike-driven layer and the SOPs per sample."""
        count = int(spikes.count_nonzero())
        self.spikes[op.name] = self.spikes.get(op.name, 0) + count
        dense = self.mode == "dense" or (
            self.mode == "auto" and count > self.dense_above * spikes.numel())
        if dense:
            self.dense_steps += 1
            fan = self.net.fanout(op).reshape(-1)
            return _dense(self.net, op, spikes), spikes.flatten(1).to(torch.float64) @ fan
        self.event_steps += 1
        return _event(self.net, op, spikes)


def _dense(net: SpikingNetwork, op: Synapse, x: torch.Tensor) -> torch.Tensor:
    weight, bias = _weight(net, op), _bias(net, op)
    if op.kind == "linear":
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, op.stride, op.padding)


def _event(net: SpikingNetwork, op: Synapse, spikes: torch.Tensor,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter-add the synapses of every spike; returns (current, SOPs per sample)."""
    batch = spikes.shape[0]
    if op.kind == "linear":
        b, i = spikes.nonzero(as_tuple=True)
        rows = _transposed(net, op).index_select(0, i)  # (n, out): one weight row per spike
        out = _bias(net, op).expand(batch, -1).clone()
        out.index_add_(0, b, rows)
        per_sample = torch.bincount(b, minlength=batch).to(torch.float64)
        return out, per_sample * op.weight.shape[0]
    o, _, kh, kw = op.weight.shape
    _, oh, ow = op.out_shape
    sh, sw = op.stride
    ph, pw = op.padding
    b, c, y, x = spikes.nonzero(as_tuple=True)
    ky = torch.arange(kh).repeat_interleave(kw)
    kx = torch.arange(kw).repeat(kh)
    # output position (i, j) receives input (y, x) through tap (ky, kx) when
    # y = i * stride + ky - padding
    yy = y[:, None] + ph - ky[None, :]
    xx = x[:, None] + pw - kx[None, :]
    hit = (yy % sh == 0) & (xx % sw == 0)
    oi, oj = yy.div(sh, rounding_mode="floor"), xx.div(sw, rounding_mode="floor")
    hit &= (oi >= 0) & (oi < oh) & (oj >= 0) & (oj < ow)
    n, tap = hit.nonzero(as_tuple=True)
    target = (b[n] * oh + oi[n, tap]) * ow + oj[n, tap]
    slices = _kernel_slices(net, op)[c[n] * (kh * kw) + tap]  # (hits, O)
    flat = torch.zeros(batch * oh * ow, o, dtype=spikes.dtype)
    flat.index_add_(0, target, slices)
    out = flat.view(batch, oh, ow, o).permute(0, 3, 1, 2) + _bias(net, op).view(1, o, 1, 1)
    per_sample = torch.bincount(b[n], minlength=batch).to(torch.float64) * o
    return out.contiguous(), per_sample


def _weight(net: SpikingNetwork, op: Synapse) -> torch.Tensor:
    return net.derived(op, "weight", lambda s: s.weight.to(net.current_dtype))


def _bias(net: SpikingNetwork, op: Synapse) -> torch.Tensor:
    return net.derived(op, "bias", lambda s: s.bias.to(net.current_dtype))


def _transposed(net: SpikingNetwork, op: Synapse) -> torch.Tensor:
    """(in, out): one weight row per input neuron."""
    return net.derived(op, "rows", lambda s: _weight(net, s).t().contiguous())


def _kernel_slices(net: SpikingNetwork, op: Synapse) -> torch.Tensor:
    """(C * kh * kw, O): the output-channel weights of each (input channel, tap)."""
    return net.derived(op, "slices", lambda s: _weight(net, s).permute(1, 2, 3, 0).reshape(
        -1, s.weight.shape[0]).contiguous())


def _pool_step(op: MaxPool, counts: torch.Tensor, peak: torch.Tensor,
               spikes: torch.Tensor) -> torch.Tensor:
    """Spike when the largest spike count in the window grows (updates the state).

    The output's spike count then equals, at every step, the maximum of its inputs'
    counts, so its rate is the max-pool of their rates: what the ANN's max-pool computes
    on activations. (Gating by the neuron that fired most, as in Rueckauer et al. 2017,
    passes extra spikes whenever the lead changes hands.)
    """
    counts += spikes
    grown = F.max_pool2d(counts, op.kernel, op.stride)
    out = grown - peak
    peak.copy_(grown)
    return out


def _route_analog(op: MaxPool | Flatten, a: torch.Tensor) -> torch.Tensor:
    if isinstance(op, MaxPool):
        return F.max_pool2d(a, op.kernel, op.stride)
    return a.flatten(1)
