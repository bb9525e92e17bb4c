"""Parameters, MACs and bytes of a model at a rank assignment, from a counter that sees every operation.

MACs are ``FLOPs / 2`` of a real forward pass of one sample under
:class:`torch.utils.flop_counter.FlopCounterMode`, so every operation the model
runs counts (1-D and 2-D convolutions, attention, LoD factors at their rank),
and a module called twice counts twice. Parameters count each tensor once,
however many modules share it. By default a layer counts as
:func:`maestro_fl.convert.extract` would deploy it: an LoD layer at rank ``r``
costs ``r·(m + n)`` weights and the MACs of its two factors, unless its dense
form ``m·n`` is smaller, in which case it costs the dense layer's.

The pass runs in eval mode with PyTorch's fused attention path switched off
(and autograd on, nothing backward): the counter sees the plain operations
that training runs.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .convert import _walk, active_ranks
from .layers import LoDLayer, dense_is_smaller
from .models import InputSpec

Inputs = tuple[int, ...] | InputSpec | torch.Tensor


@dataclass(frozen=True)
class LayerFootprint:
    name: str
    kind: str  # "lod", or the module's class name in lower case ("linear", "conv1d", ...), or "(other)"
    rank: int | None
    params: int
    macs: int
    dense_params: int
    dense_macs: int


@dataclass(frozen=True)
class Footprint:
    """Per-layer rows and totals; ``dense_*`` are the dense model's numbers."""

    layers: tuple[LayerFootprint, ...]

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def dense_params(self) -> int:
        return sum(layer.dense_params for layer in self.layers)

    @property
    def dense_macs(self) -> int:
        return sum(layer.dense_macs for layer in self.layers)

    def bytes(self, precision: str = "fp32") -> int:
        """Size of the weights at ``precision`` ('fp32' or 'fp16')."""
        width = {"fp32": 4, "fp16": 2}
        if precision not in width:
            raise ValueError(f"precision must be one of {sorted(width)}, got {precision!r}")
        return self.params * width[precision]

    def summary(self) -> dict[str, float]:
        return {
            "params": self.params,
            "macs": self.macs,
            "bytes_fp32": self.bytes("fp32"),
            "bytes_fp16": self.bytes("fp16"),
            "dense_params": self.dense_params,
            "dense_macs": self.dense_macs,
            "params_ratio": self.params / self.dense_params,
            "macs_ratio": self.macs / self.dense_macs if self.dense_macs else 1.0,
        }

    def rows(self) -> list[dict[str, object]]:
        return [asdict(layer) for layer in self.layers]


def example_input(inputs: Inputs, model: nn.Module) -> torch.Tensor:
    """One all-zero sample for a shape (float), an :class:`InputSpec` (its dtype) or a given tensor."""
    if isinstance(inputs, torch.Tensor):
        return inputs
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if isinstance(inputs, InputSpec):
        return inputs.example(1).to(device)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.zeros(1, *inputs, device=device, dtype=dtype)


def probe_batch(inputs: Inputs, model: nn.Module) -> torch.Tensor:
    """The example input, twice when it is one sample: batch norm that uses batch statistics in eval mode
    (the static BN of width methods) refuses one value per channel, as after a ResNet's pool on 8×8 inputs."""
    x = example_input(inputs, model)
    return torch.cat([x, x]) if len(x) == 1 else x


@torch.no_grad()
def probe_forward(
    model: nn.Module,
    inputs: Inputs,
    ranks: Mapping[str, int] | None,
    hooks: list[tuple[nn.Module, Callable[..., None]]],
) -> None:
    """Run the probe batch through the model at ``ranks`` with temporary forward hooks (eval mode); the hooks
    read the first sample of each output."""
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    was_training = model.training
    model.eval()
    try:
        with active_ranks(model, ranks):
            model(probe_batch(inputs, model))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def recurrent_macs(module: nn.RNNBase, steps: int) -> int:
    """Multiply-accumulates of one sample through ``module`` over ``steps`` time steps, by formula.

    Per step, layer and direction: ``gates · hidden · (input + state)``, with
    4 gates for an LSTM, 3 for a GRU and 1 for a plain RNN; an LSTM with
    ``proj_size`` adds its ``hidden · proj`` projection. Element-wise gate
    arithmetic is not counted (as for every other layer here).
    """
    gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
    hidden, proj = module.hidden_size, getattr(module, "proj_size", 0) or 0
    state = proj or hidden
    directions = 2 if module.bidirectional else 1
    total, width = 0, module.input_size
    for _ in range(module.num_layers):
        per_direction = gates * hidden * (width + state) + (hidden * proj if proj else 0)
        total += directions * per_direction
        width = state * directions
    return total * steps


def _steps(module: nn.RNNBase, args: tuple[object, ...]) -> int:
    """Time steps of one sample in a recurrent module's input (a tensor, or a PackedSequence: its mean length)."""
    x = args[0] if args else None
    if isinstance(x, nn.utils.rnn.PackedSequence):
        return int(x.data.shape[0]) // max(int(x.batch_sizes[0]), 1)
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return 1 if isinstance(x, torch.Tensor) else 0
    return int(x.shape[1] if module.batch_first else x.shape[0])


def _cpu_attention_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args: object,
                         out_shape: object = None, **kwargs: object) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


#: formulas for operations the counter's own registry lacks: the CPU kernel of scaled_dot_product_attention
#: (``nn.MultiheadAttention`` and LoD attention run it) counted 0 FLOPs in torch 2.14, so attention's
#: ``2·L·S·d`` per head went uncounted on a CPU; the formula is the counter's own one for the GPU kernels
MISSING_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def count_flops(model: nn.Module, inputs: Inputs, ranks: Mapping[str, int] | None = None) -> dict[str, int]:
    """FLOPs of one sample's forward pass per module path (inclusive of children; ``""`` is the whole model).

    Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) run as one fused
    operation on the CPU that ``FlopCounterMode`` does not see (it counted 3.4%
    of an LSTM's hand count); where it sees less than half of their formula
    (:func:`recurrent_macs`), the formula counts instead.
    """
    was_training = model.training
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    x = probe_batch(inputs, model)
    steps: dict[str, int] = {}
    names = {id(m): path for path, m in model.named_modules()}
    handles = [m.register_forward_pre_hook(
        lambda mod, args, path=names[id(m)]: steps.__setitem__(path, steps.get(path, 0) + _steps(mod, args)))  # noqa: B008 - binds each module's path now
        for m in model.modules() if isinstance(m, nn.RNNBase)]
    try:
        # no fused attention path: it would read every LoD layer's ``.weight`` (a U Vᵀ product) to decide
        torch.backends.mha.set_fastpath_enabled(False)
        with (active_ranks(model, ranks), torch.enable_grad(),
              FlopCounterMode(display=False, custom_mapping=MISSING_FLOP_FORMULAS) as counter):
            model(x)
    finally:
        for h in handles:
            h.remove()
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    out: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        path = key.split(".", 1)[1] if "." in key else ""  # drop the root's class name
        out[path] = int(sum(ops.values())) // len(x)  # every counted op is linear in the batch
    out.setdefault("", int(counter.get_total_flops()) // len(x))
    modules = dict(model.named_modules())
    for path, n in steps.items():
        formula = 2 * recurrent_macs(modules[path], n)
        missing = formula - out.get(path, 0)
        if out.get(path, 0) < formula // 2:  # the counter missed the fused op: add what it missed, up the tree
            parts = path.split(".") if path else []
            for depth in range(len(parts) + 1):
                ancestor = ".".join(parts[:depth])
                out[ancestor] = out.get(ancestor, 0) + missing
    return out


# -- measured once per (structure, input, ranks) --------------------------------------------------
def structure_key(model: nn.Module) -> Hashable:
    """What a model's counts depend on, hashable: two models with the same key count the same.

    The modules' classes (the objects, so a class redefined in a notebook is a
    new key) and their ``repr`` (every layer's hyperparameters: strides,
    padding, an LoD layer's ranks), every parameter's and buffer's name, shape
    and dtype, which parameters are one tensor (tied weights count once), and
    every module's public plain attributes (numbers, strings, flags: the
    training flag, and a flag of one's own module that its forward branches on
    but its repr does not print). Weight values are not in it: counts never
    depend on them.
    """
    named = list(model.named_parameters(remove_duplicate=False))
    modules = [m for _, m in model.named_modules(remove_duplicate=False)]
    plain = tuple(tuple((k, v) for k, v in sorted(vars(m).items())
                        if not k.startswith("_") and isinstance(v, bool | int | float | str | None)) for m in modules)
    first: dict[int, int] = {}
    ties = tuple(first.setdefault(id(p), i) for i, (_, p) in enumerate(named))
    return (
        repr(model),
        tuple(type(m) for m in modules),
        tuple((n, tuple(p.shape), p.dtype) for n, p in named),
        ties,
        tuple((n, tuple(b.shape), b.dtype) for n, b in model.named_buffers()),
        plain,
    )


def _tensor_key(x: torch.Tensor) -> Hashable:
    data = x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return (tuple(x.shape), x.dtype, hashlib.sha1(data).hexdigest())


def inputs_key(inputs: Inputs) -> Hashable:
    """What a count depends on of its input: a shape, a sample's values, or an InputSpec with its sample."""
    if isinstance(inputs, torch.Tensor):
        return ("tensor", _tensor_key(inputs))
    if isinstance(inputs, InputSpec):
        sample = None if inputs.sample is None else _tensor_key(inputs.sample)
        return ("spec", inputs.shape, inputs.num_classes, inputs.dtype, inputs.vocab_size, sample)
    return ("shape", tuple(inputs))


class MeasurementCache:
    """Least-recently-used counts by (what is counted, model structure, input, ranks).

    A federation measures the same sub-models again and again: every
    federation builds its cost tables (20 fractions, a counted forward each),
    every sweep run and every test the same ones. Counts are pure functions of
    the key (:func:`structure_key`), so one process measures each once.
    """

    def __init__(self, size: int = 8192) -> None:
        self.size = size
        self._entries: OrderedDict[Hashable, object] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: Hashable, measure: Callable[[], object]) -> object:
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]
        self.misses += 1
        value = self._entries[key] = measure()
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()
        self.hits = self.misses = 0


#: the process's counts: footprints and activation counts
MEASURED = MeasurementCache()


def measured(what: str, model: nn.Module, inputs: Inputs, ranks: Mapping[str, int] | None,
             measure: Callable[[], object], *extra: Hashable) -> object:
    """``measure()``, or the value it gave for the same structure, input and ranks (:data:`MEASURED`)."""
    key = (what, structure_key(model), inputs_key(inputs), tuple(sorted((ranks or {}).items())), extra)
    return MEASURED.get(key, measure)


def footprint(
    model: nn.Module,
    inputs: Inputs,
    ranks: Mapping[str, int] | None = None,
    *,
    as_deployed: bool = True,
) -> Footprint:
    """Footprint of ``model`` at ``ranks`` for one input.

    Parameters
    ----------
    inputs : tuple, InputSpec or Tensor
        One sample's shape (float inputs), its :class:`~maestro_fl.models.InputSpec`
        (token ids need its integer dtype), or a sample batch of one.
    ranks : dict, optional
        Per-LoD-layer ranks; layers not named count at their ``max_rank``.
    as_deployed : bool
        Count an LoD layer whose dense form is smaller as dense (the extraction
        rule). ``False`` counts the factors as they are trained.

    Counted once per structure, input and ranks in a process (:func:`measured`).
    """
    value = measured("footprint", model, inputs, ranks, lambda: _count_footprint(model, inputs, ranks, as_deployed),
                     as_deployed)
    assert isinstance(value, Footprint)
    return value


def _count_footprint(model: nn.Module, inputs: Inputs, ranks: Mapping[str, int] | None, as_deployed: bool) -> Footprint:
    ranks = dict(ranks or {})
    flops = count_flops(model, inputs, ranks)
    seen_modules: set[int] = set()
    seen_params: set[int] = set()
    rows: list[LayerFootprint] = []

    def inclusive(path: str, module: nn.Module) -> int:
        """A module's FLOPs with its children's; a container never called (a ModuleList) sums its children."""
        if path in flops:
            return flops[path]
        prefix = f"{path}." if path else ""
        return sum(inclusive(prefix + name, child) for name, child in module.named_children())

    def exclusive(path: str, module: nn.Module) -> int:
        prefix = f"{path}." if path else ""
        return inclusive(path, module) - sum(inclusive(prefix + n, c) for n, c in module.named_children())

    def new_params(params: list[nn.Parameter]) -> int:
        count = 0
        for p in params:
            if id(p) not in seen_params:
                seen_params.add(id(p))
                count += p.numel()
        return count

    for path, module in [("", model), *_walk(model)]:
        if id(module) in seen_modules:  # a module registered under several names counts once, under its first
            continue
        seen_modules.add(id(module))
        if isinstance(module, LoDLayer):
            m, n = module.fan_out, module.fan_in
            r = ranks.get(path, module.max_rank) if module.active_rank is None or path in ranks else module.active_rank
            bias = 0 if module.bias is None else module.bias.numel()
            new_params(list(module.parameters()))
            macs = flops.get(path, 0) // 2
            dense_macs = macs * m * n // max(r * (m + n), 1)
            if as_deployed and dense_is_smaller(m, n, r):
                rows.append(LayerFootprint(path, "lod", r, m * n + bias, dense_macs, m * n + bias, dense_macs))
            else:
                rows.append(LayerFootprint(path, "lod", r, r * (m + n) + bias, macs, m * n + bias, dense_macs))
            continue
        own = new_params(list(module.parameters(recurse=False)))
        macs = exclusive(path, module) // 2
        if own or macs:
            kind = "(other)" if not path else type(module).__name__.lower()
            rows.append(LayerFootprint(path or "(root)", kind, None, own, macs, own, macs))
    return Footprint(tuple(rows))
