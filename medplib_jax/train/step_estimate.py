"""An ESTIMATE of a TPU train step's time and MFU from XLA's own cost model, on a host with no TPU.

A TPU executable's `cost_analysis()` carries `optimal_seconds`, the compiler's cost-model estimate of one run of
the program on one device, beside its FLOPs. Two things keep it from being the step time as it stands:
- a `lax.scan` body (the layer scan, the micro-batch scan of `grad_accum`) is counted once, not once per trip;
- a Pallas kernel (the splash attention of `llm.attention='splash'`) is a custom call whose FLOPs XLA does not see.
So the step is compiled twice more at reduced depth, for one micro-batch (`grad_accum` 1) with the LLM's layers
unrolled: 1 layer and 2 layers. The difference is one layer; the 1-layer program holds everything else once
(vision towers, embeddings, LM head, SAM decoder, losses, the optimizer update). Then

    step = grad_accum x (t(1) + (layers - 1) x (t(2) - t(1)))

where each t adds to `optimal_seconds` the program's Pallas attention kernels at the chip's bf16 peak: their
matmuls (forward 2, dq 3, dkv 4, each B x H x T x T x head_dim over the causal tiles the kernel visits) spread
evenly over the devices. The optimizer update is counted once per micro-batch instead of once per step (well under
1% at 7B, whose update is elementwise over FSDP shards). MFU = the explicit FLOP formula of the whole step
(train/flops.py, MaxText's convention) / (step x devices x peak).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import ml_collections as mlc

# T x T matmuls one call of each splash kernel does: the forward (QK^T, PV; also its remat recompute), dq
# (QK^T recomputed, dP = dO V^T, dQ = dS K), dkv (QK^T recomputed, dV = P^T dO, dP, dK = dS^T Q).
SPLASH_MATMULS = {'fwd': 2, 'dq': 3, 'dkv': 4}
_SPLASH = re.compile(r'splash_\w*?_(fwd|dq|dkv)_')
# libtpu's own Mosaic kernels for `lax.ragged_dot` (the grouped MoE dispatch): XLA's cost analysis prices these
# (a probe: its FLOPs equal 2 m k n forward, 3x that with the gradients), so nothing is added for them.
_XLA_PRICED = re.compile(r'^ragged[-_]dot')


@dataclasses.dataclass(frozen=True)
class StepEstimate:
    layers: int  # the LLM's, at full depth
    grad_accum: int
    devices: int
    peak_flops: float  # bf16 per device
    xla_seconds: tuple[float, float]  # optimal_seconds of the 1- and 2-layer micro-batch programs
    kernel_seconds: tuple[float, float]  # their Pallas attention kernels at peak
    xla_flops: tuple[float, float]  # per device, what XLA's cost analysis counts
    kernel_flops: tuple[float, float]  # per device
    kernels_per_layer: dict[str, int]  # Pallas calls one layer adds, by kernel name
    step_seconds: float
    step_flops_per_device: float  # what the compiled step computes, recompute and kernels included
    model_flops: float  # the formula's, whole step over all devices
    mfu: float

    @property
    def one_layer_seconds(self) -> float:
        """The 1-layer micro-batch program, its kernels included."""
        return self.xla_seconds[0] + self.kernel_seconds[0]

    @property
    def per_layer_seconds(self) -> float:
        """What one more LLM layer adds to a micro-batch."""
        return self.xla_seconds[1] + self.kernel_seconds[1] - self.one_layer_seconds

    @property
    def recompute_ratio(self) -> float:
        """Compiled FLOPs over the model's (remat recompute, causal tiles skipped, padding)."""
        return self.step_flops_per_device * self.devices / self.model_flops

    @property
    def chip_utilization(self) -> float:
        """What the chips compute over what they could: the compiled FLOPs (not the formula's) / (step x peak).
        Below the MFU where the formula counts work the step skips: the 6 x parameters convention counts weight
        gradients of the frozen weights too, which a LoRA stage never computes."""
        return self.step_flops_per_device / (self.step_seconds * self.peak_flops)


def reduced(config: mlc.ConfigDict, layers: int) -> mlc.ConfigDict:
    """The config with `layers` unrolled LLM layers and one micro-batch of the original size per step."""
    c = config.copy_and_resolve_references()
    c.model.llm.num_layers = layers
    c.model.scan_layers = False
    c.data.batch_size = int(config.data.batch_size) // int(config.train.grad_accum)
    c.train.grad_accum = 1
    return c


def kernel_flops(kernels: dict[str, int], config: mlc.ConfigDict, rows: int, length: int, devices: int) -> float:
    """FLOPs per device of a program's Pallas splash kernels (by name, as `compile_step` counts them); libtpu's
    ragged-dot kernels count 0 here (XLA prices them)."""
    from medplib_jax.models.layers import SPLASH_BLOCK
    llm = config.model.llm
    padded = -(-length // SPLASH_BLOCK) * SPLASH_BLOCK
    n = padded // SPLASH_BLOCK
    visited = n * (n + 1) / 2 / n ** 2  # causal: tiles on or below the diagonal
    per_matmul = 2.0 * rows * int(llm.num_heads) * padded ** 2 * (int(llm.hidden_size) // int(llm.num_heads)) * visited
    total = 0.0
    for name, calls in kernels.items():
        if _XLA_PRICED.search(name):
            continue
        m = _SPLASH.search(name)
        if not m:
            raise ValueError(f'step estimate: the program holds a Pallas kernel {name!r} whose cost is not known '
                             f'here (known: the splash attention kernels)')
        total += calls * SPLASH_MATMULS[m[1]] * per_matmul
    return total / devices


def estimate(config: mlc.ConfigDict, devices: list, compile_step: Callable[..., dict[str, Any]],
             log: Callable[[str], None] = print) -> StepEstimate:
    """Compiles the 1- and 2-layer micro-batch programs over `devices` (abstract TPU devices) with `compile_step`
    (compile_check's) -> the estimate of the config's whole step."""
    from medplib_jax.models.medplib import MedPLIBConfig
    from medplib_jax.train import flops as flops_lib
    layers = int(config.model.llm.num_layers)
    mode = str(config.model.moe.mode)
    if mode not in ('none', 'dense'):
        raise ValueError(f'step estimate: model.moe.mode={mode!r} makes the layers differ; the per-layer '
                         f'extrapolation needs every layer alike (model.moe.mode none or dense)')
    peak = flops_lib.peak_flops(devices[0].device_kind)
    if peak is None:
        raise ValueError(f'step estimate: no bf16 peak known for {devices[0].device_kind!r} (train/flops.py '
                         f'PEAK_FLOPS)')
    accum = int(config.train.grad_accum)
    xla_s, xla_f, k_s, k_f, kernels = [], [], [], [], []
    for depth in (1, 2):
        log(f'step estimate: compiling one micro-batch with {depth} unrolled LLM layer(s) ...')
        fig = compile_step(reduced(config, depth), devices, log)
        if fig['memory'] is None:
            raise ValueError(f'step estimate: the {depth}-layer program did not compile '
                             f'({fig.get("oom") or "skipped"})')
        if fig['xla_seconds'] <= 0:
            raise ValueError(f'step estimate: the compiler\'s cost model gave the {depth}-layer program '
                             f'{fig["xla_seconds"]:.4g} s (no estimate for this target)')
        kf = kernel_flops(fig['pallas_kernels'], config, fig['batch'], fig['length'], len(devices))
        xla_s.append(fig['xla_seconds'])
        xla_f.append(fig['flops_per_device'])
        k_f.append(kf)
        k_s.append(kf / peak)
        kernels.append(fig['pallas_kernels'])
    per_layer_s = (xla_s[1] + k_s[1]) - (xla_s[0] + k_s[0])
    per_layer_f = (xla_f[1] + k_f[1]) - (xla_f[0] + k_f[0])
    step_s = accum * (xla_s[0] + k_s[0] + (layers - 1) * per_layer_s)
    step_f = accum * (xla_f[0] + k_f[0] + (layers - 1) * per_layer_f)
    model_flops = flops_lib.step_flops(MedPLIBConfig.from_model_config(config.model), int(config.data.batch_size),
                                       fig['length']).total
    per_layer_kernels = {k: kernels[1].get(k, 0) - kernels[0].get(k, 0) for k in {*kernels[0], *kernels[1]}}
    return StepEstimate(layers=layers, grad_accum=accum, devices=len(devices), peak_flops=peak,
                        xla_seconds=tuple(xla_s), kernel_seconds=tuple(k_s), xla_flops=tuple(xla_f),
                        kernel_flops=tuple(k_f), kernels_per_layer={k: v for k, v in per_layer_kernels.items() if v},
                        step_seconds=step_s, step_flops_per_device=step_f, model_flops=model_flops,
                        mfu=model_flops / (step_s * len(devices) * peak))


def describe(e: StepEstimate) -> list[str]:
    """Report lines, labelled as the estimate they are."""
    per_layer = e.per_layer_seconds
    rest = e.one_layer_seconds - per_layer
    kernels = (f'; Pallas kernels per layer {dict(sorted(e.kernels_per_layer.items()))}, splash counted at the bf16 '
               f'peak ({e.kernel_seconds[1] - e.kernel_seconds[0]:.4g} s of each layer), ragged-dot priced by XLA'
               if e.kernels_per_layer else '')
    return [f'  ESTIMATE (XLA\'s cost model, optimal_seconds; not measured): step {e.step_seconds:.4g} s = '
            f'{e.grad_accum} micro-batch(es) x ({e.layers} layers x {per_layer:.4g} s + {rest:.4g} s outside the '
            f'layers){kernels}',
            f'  ESTIMATE: MFU {e.mfu:.1%} (formula {e.model_flops / 1e12:.4g} TFLOP / (step x {e.devices} devices x '
            f'{e.peak_flops / 1e12:.0f} TFLOP/s bf16)); the compiled step computes {e.recompute_ratio:.2f}x the '
            f'formula\'s FLOPs (remat recompute, padding and tiles add; the frozen weights\' gradients, which the '
            f'formula counts, are not computed): {e.chip_utilization:.1%} of the chips\' peak']
