"""Levels found with forward hooks on a module's block list, and the hook runner.

For models FX cannot trace (every transformers model, modules with
data-dependent control flow), one forward on the meta device with a hook on
every module records what each module returns. The model's *block container*
is the shallowest ``nn.ModuleList`` (or ``nn.Sequential``) holding the most
parameters (``layers`` of ViT, ``encoder.stages`` of ResNet and ConvNeXt).

* Token blocks (``[N, L, C]``): one level per block, the reduction being the
  patch size (given, or read off the patch embedding's map).
* Map blocks: for each reduction, the last map at that reduction among the
  modules that run before the first block and the blocks themselves; where
  every block keeps one map size (ViTDet), one level per block.

The calling convention (how the model takes pixels, keyword arguments forced
on blocks, where in a block's output the level is) comes from the adapter as
data. The runner keeps the blocks up to the deepest requested level, skips
what follows the blocks (pooler, heads) except the final norm, and records the
requested levels with hooks that write into a per-call context: concurrent
calls never see each other's tensors.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from unifeat._engine.dilation import SPATIAL_OPS
from unifeat._engine.graph import is_norm, resolve_return_nodes
from unifeat._engine.levels import FeatureMap, Level, spatial, to_map, token_grid
from unifeat._engine.meta import weightless
from unifeat._engine.model import Runner, final_norm_refusal
from unifeat._errors import UnsupportedOptionError, format_choices

Where = tuple[tuple[int, ...], tuple[int, ...] | None]
"""Where a level is in a block's output: the index path to the tensor, and for
tokens returned with their height and width, where those are (one index: a
``(height, width, ...)`` tuple there; two: height and width)."""
FIRST: Where = ((0,), None)
_MAX_STAGE_PREFIX = 4


@dataclass(frozen=True)
class CallingConvention:
    """How to run a model and read its blocks: zoo knowledge handed over as data."""

    input_keyword: str | None = None
    """``"pixel_values"``: called as ``trunk(pixel_values=x)``; None: ``trunk(x)``."""
    resize_keyword: str | None = None
    """A keyword set to True for inputs of another size than the native one
    (transformers' ``interpolate_pos_encoding``)."""
    block_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments forced on every block call."""
    block_output: Where = FIRST
    block_tail: tuple[str, ...] = ()
    """Attributes of the deepest kept block that only run after its level (a Swin
    stage's downsampling), dropped when the model is cut there."""
    containers: tuple[type[nn.Module], ...] = (nn.ModuleList, nn.Sequential)
    patch_size: int | None = None
    """The patch size of token models, where the config says it."""
    prepare: Callable[[Tensor], dict[str, Any]] | None = None
    """Turns pixels into the keyword arguments a model takes instead (SigLIP 2's
    patches, mask and shapes)."""
    final_as_level: bool = False
    """The library lays each block's output out as the level reads it (PVT v2's
    encoder turns a stage's tokens into its map): the final output is that map."""
    reshape: Callable[[nn.Module, Tensor, int, tuple[int, int]], Tensor] | None = None
    """``(trunk, level tensor, block index, input (H, W)) -> NCHW map`` where a model
    keeps its tokens in an order of its own (Hiera's unrolled mask units, the
    windows of RF-DETR's and LW-DETR's ViTs)."""

    def inputs(self, x: Tensor, resized: bool) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kwargs: dict[str, Any] = {}
        if self.resize_keyword is not None and resized:
            kwargs[self.resize_keyword] = True
        if self.prepare is not None:
            return (), {**kwargs, **self.prepare(x)}
        if self.input_keyword is None:
            return (x,), kwargs
        kwargs[self.input_keyword] = x
        return (), kwargs


def first_tensor(output: Any) -> Tensor | None:
    """The tensor a module returns, or the first item of a tuple it returns."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        item = output[0]
        return item if isinstance(item, Tensor) else first_tensor(item)
    if isinstance(output, Mapping) and output:
        return first_tensor(next(iter(output.values())))
    return None


def level_tensor(output: Any, where: Where) -> Tensor | None:
    """The level in a module's output: a map, or tokens laid out as a map with the
    height and width the module returns beside them."""
    path, dims = where
    item = output
    for position in path:
        if isinstance(item, Tensor) or not isinstance(item, (tuple, list)):
            break
        if len(item) <= position:
            return None
        item = item[position]
    tensor = item if isinstance(item, Tensor) else first_tensor(item)
    if tensor is None or dims is None or tensor.dim() != 3:
        return tensor
    if len(dims) == 1:
        height, width = (int(d) for d in output[dims[0]][:2])
    else:
        height, width = int(output[dims[0]]), int(output[dims[1]])
    return tensor.reshape(tensor.shape[0], height, width, tensor.shape[2]).permute(0, 3, 1, 2)


def _force_kwargs(
    forced: Mapping[str, Any], module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, {**kwargs, **forced}


def _container(trunk: nn.Module, types: tuple[type[nn.Module], ...]) -> str | None:
    """The shallowest container that holds the most parameters."""
    lists = [
        (name, module)
        for name, module in trunk.named_modules()
        if isinstance(module, types) and len(list(module.children())) > 1
    ]
    if not lists:
        return None

    def weight(item: tuple[str, nn.Module]) -> tuple[int, int]:
        name, module = item
        depth = name.count(".") + (1 if name else 0)
        return sum(p.numel() for p in module.parameters()), -depth

    return max(lists, key=weight)[0]


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


@dataclass
class _Record:
    path: str
    module: nn.Module
    output: Any
    """The output's shape (a level's, for blocks), or None."""
    primary: Any = None
    """The shape of the first tensor the module returns."""


class HookFinder:
    """One meta-device forward of ``trunk`` with a hook on every module.

    ``trunk_path`` locates the trunk in ``source`` (names in the results are
    the source's). A module with real weights is run with meta stand-ins for
    them: nothing is computed, copied or changed.
    """

    def __init__(
        self,
        source: nn.Module,
        *,
        trunk_path: str = "",
        convention: CallingConvention,
        input_size: tuple[int, int, int],
        context: str,
    ) -> None:
        self.source = source
        self.trunk_path = trunk_path
        self.trunk = source.get_submodule(trunk_path)
        self.convention = convention
        self.input_size = input_size
        self.size = (input_size[1], input_size[2])
        self.context = context
        self.container = _container(self.trunk, convention.containers)
        self.block_inputs: dict[str, tuple[int, ...]] = {}
        self.records, self.ops = self._shape_pass(self.trunk, self.container)

    # -- the shape pass ------------------------------------------------------------------

    def _shape_pass(
        self, source: nn.Module, container: str | None
    ) -> tuple[list[_Record], list[tuple[str, nn.Module, int]]]:
        """Records of one meta forward of ``source``'s weightless replica, hooked and in
        eval mode (two samples: norms after a global pool work); ``source`` itself
        gets no hook, mode or tensor of ours, so threads running it are undisturbed."""
        return self._hooked_pass(weightless(source).module.eval(), container)

    def _hooked_pass(
        self, trunk: nn.Module, container: str | None
    ) -> tuple[list[_Record], list[tuple[str, nn.Module, int]]]:
        blocks = (
            {
                id(child): index
                for index, child in enumerate(
                    cast(nn.Module, trunk.get_submodule(container)).children()
                )
            }
            if container is not None
            else {}
        )
        records: list[_Record] = []
        ops: list[tuple[str, nn.Module, int]] = []
        reshape = self.convention.reshape

        def after(path: str, module: nn.Module, args: Any, output: Any) -> None:
            where = self.convention.block_output if id(module) in blocks else FIRST
            tensor = level_tensor(output, where)
            if reshape is not None and tensor is not None and id(module) in blocks:
                tensor = reshape(trunk, tensor, blocks[id(module)], self.size)
            primary = first_tensor(output)
            records.append(
                _Record(
                    path,
                    module,
                    tuple(tensor.shape) if tensor is not None else None,
                    tuple(primary.shape) if primary is not None else None,
                )
            )

        def before(path: str, module: nn.Module, args: Any) -> None:
            tensor = first_tensor(args)
            if id(module) in blocks and tensor is not None:
                self.block_inputs[path] = tuple(tensor.shape)
            found = spatial(tuple(tensor.shape), self.size) if tensor is not None else None
            if found is not None and isinstance(module, SPATIAL_OPS):
                ops.append((path, module, found[1]))

        for path, module in trunk.named_modules():
            module.register_forward_hook(functools.partial(after, path))
            if isinstance(module, SPATIAL_OPS) or id(module) in blocks:
                module.register_forward_pre_hook(functools.partial(before, path))
            if id(module) in blocks and self.convention.block_kwargs:
                module.register_forward_pre_hook(
                    functools.partial(_force_kwargs, self.convention.block_kwargs),
                    with_kwargs=True,
                )
        channels, height, width = self.input_size
        pixels = torch.empty(2, channels, height, width, device="meta")
        args, kwargs = self.convention.inputs(pixels, resized=False)
        try:
            with torch.no_grad():
                trunk(*args, **kwargs)
        except Exception as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedOptionError(
                f"could not run {self.context} on a 2x{channels}x{height}x{width} input on the "
                f"meta device to find its levels ({type(exc).__name__}: {text})"
            ) from None
        return records, ops

    # -- names ---------------------------------------------------------------------------

    def node_names(self) -> list[str]:
        """Module paths (the source's) in the order the modules finish running."""
        names = []
        for record in self.records:
            name = _join(self.trunk_path, record.path)
            if name and name not in names:
                names.append(name)
        return names

    # -- levels --------------------------------------------------------------------------

    def _block_records(self) -> list[tuple[int, _Record]]:
        """``(block index, record)`` of each block of the container, in order.

        Where the container's children are never called themselves (stages held
        as lists of blocks the forward iterates: PVT, PoolFormer), a stage's
        output is the output of the last module that ran inside it.
        """
        if self.container is None:
            return []
        prefix = f"{self.container}." if self.container else ""
        direct: dict[int, _Record] = {}
        inner: dict[int, _Record] = {}
        for record in self.records:
            rest = record.path[len(prefix) :] if record.path.startswith(prefix) else None
            if rest is None:
                continue
            head, _, tail = rest.partition(".")
            if not head.isdigit():
                continue
            if not tail:
                direct[int(head)] = record
            elif tail.split(".")[0].isdigit() and tail.count(".") == 0:
                inner[int(head)] = record  # the last block of the stage that ran
        if direct:
            return [(i, self._before_downsampling(record)) for i, record in sorted(direct.items())]
        return [(i, self._stage_end(record)) for i, record in sorted(inner.items())]

    def _stage_end(self, last_block: _Record) -> _Record:
        """A stage held as a list of blocks ends where the next one starts: what runs
        after its last block at the same size (PVT's stage norm) belongs to it."""
        end = last_block
        for record in self.records[self.records.index(last_block) + 1 :]:
            if record.path.startswith(f"{self.container}."):
                break  # the next stage's blocks
            if record.primary != last_block.primary or record.path.count(".") < 1:
                if record.primary != last_block.primary:
                    break
                continue
            end = record
        return end

    def _before_downsampling(self, stage: _Record) -> _Record:
        """A token stage that ends by downsampling (LeViT's, MaskFormer-Swin's) has its
        level before that: the output of its last sub-block that still holds the
        stage's input tokens."""
        given = self.block_inputs.get(stage.path)
        out = stage.output  # the level as the convention reads it (Swin's: before)
        if not given or not out or len(given) != 3 or len(out) != 3 or out[1] >= given[1]:
            return stage
        depth = stage.path.count(".") + 2
        inside = [
            r
            for r in self.records
            if r.path.startswith(f"{stage.path}.") and r.path.count(".") == depth
        ]
        kept = None
        for record in inside:
            shape = record.primary
            if not shape or len(shape) != 3:
                continue
            if shape[1] != given[1]:
                break
            kept = record
        return kept or stage

    def levels(self) -> list[Level]:
        """The automatic levels (see the module docstring)."""
        blocks = self._block_records()
        if self.container is None or not blocks:
            raise UnsupportedOptionError(
                f"{self.context} has no list of blocks (nn.ModuleList or nn.Sequential) that "
                "runs on the input, to take feature levels from"
            )
        if blocks[0][1].output is None:
            raise UnsupportedOptionError(
                f"the blocks of {self.context} return no tensors to take levels from"
            )
        first = blocks[0][1].output
        if len(first) == 3:
            plain = self._plain_token_levels(blocks)
            return plain if plain is not None else self._map_levels(blocks, tokens=True)
        if len(first) != 4:
            raise UnsupportedOptionError(
                f"the blocks of {self.context} return {len(first)}-D tensors; feature levels "
                "need maps [N, C, H, W] or tokens [N, L, C]"
            )
        return self._map_levels(blocks, tokens=False)

    def _level(
        self,
        record: _Record,
        channels: int,
        reduction: int,
        layout: Any,
        block: int,
        prefix: int = 0,
        grid: Any = "exact",
    ) -> Level:
        name = _join(self.trunk_path, record.path)
        return Level(
            name,
            channels,
            reduction,
            layout,
            where=record.path,
            block=block,
            num_prefix_tokens=prefix,
            grid=grid,
        )

    def _plain_token_levels(self, blocks: list[tuple[int, _Record]]) -> list[Level] | None:
        """One level per block where every block keeps one number of tokens over a
        patch grid (plus a few prefix tokens); None for hierarchical token models."""
        lengths = {record.output[1] for _, record in blocks if record.output is not None}
        if len(lengths) != 1:
            return None
        patch = self.convention.patch_size or self._patch_from_embedding(blocks)
        if patch is None:
            return None
        height, width = self.size
        cells = (height // patch) * (width // patch)
        prefix = token_grid((0, next(iter(lengths)), 0), cells)
        if prefix is None:
            raise UnsupportedOptionError(
                f"{self.context} has {next(iter(lengths))} tokens per block, which are not a "
                f"{height // patch}x{width // patch} grid of patches of size {patch} (plus a "
                "few prefix tokens)"
            )
        return [
            self._level(record, int(record.output[2]), patch, "tokens", index, prefix)
            for index, record in blocks
        ]

    def _patch_from_embedding(self, blocks: list[tuple[int, _Record]]) -> int | None:
        """The reduction of the last map before the first block whose cells the
        blocks' tokens hold (a patch embedding's output)."""
        first = self.records.index(blocks[0][1])
        length = blocks[0][1].output[1]
        for record in reversed(self.records[:first]):
            shape = record.primary
            found = spatial(shape, self.size) if isinstance(shape, tuple) else None
            if found is not None and token_grid((0, length, 0), shape[2] * shape[3]) is not None:
                return found[1]
        return None

    def _token_map(self, shape: tuple[int, ...]) -> tuple[str, int, int] | None:
        """A hierarchical token level read as a map: ``L`` tokens that fill a
        ``ceil(H / r) x ceil(W / r)`` grid for one power of two ``r``, after at most a
        few prefix tokens (PVT's last stage has a class token)."""
        height, width = self.size
        for power in range(1, 8):
            r = 2**power
            if 0 <= shape[1] - -(-height // r) * -(-width // r) <= _MAX_STAGE_PREFIX:
                return "tokens", r, int(shape[2])
        return None

    def _map_levels(self, blocks: list[tuple[int, _Record]], *, tokens: bool) -> list[Level]:
        def read(shape: Any) -> tuple[str, int, int] | None:
            if not isinstance(shape, tuple):
                return None
            if len(shape) == 3:
                return self._token_map(shape) if tokens else None
            found = spatial(shape, self.size)
            # The input itself (a normalization or padding before the stem) is no level.
            # Channels-last maps count too (SAM 2's Hiera blocks return [N, H, W, C]).
            usable = found is not None and found[1] >= 2
            return found if usable else None

        maps = [read(record.output) for _, record in blocks]
        skewed = [
            record.path
            for _, record in blocks
            if isinstance(record.output, tuple)
            and len(record.output) == 4
            and spatial(record.output, self.size) is None
            and min(record.output[2:]) > 1
        ]
        if skewed and not tokens:
            raise UnsupportedOptionError(
                f"the blocks of {self.context} reduce height and width by different factors "
                f"({skewed[0]!r} returns {blocks[-1][1].output} for a {self.size[0]}x"
                f"{self.size[1]} input): a feature level has one reduction"
            )
        if tokens and any(found is None for found in maps):
            raise UnsupportedOptionError(
                f"{self.context} is a token model whose blocks change the number of tokens "
                "without returning their height and width, in a way that is no grid; unifeat "
                "reads levels off plain token models (ViT-like), token grids and maps"
            )
        if len(maps) > 1 and len(set(maps)) == 1 and maps[0] is not None and not tokens:
            # Every block keeps one map size (ViTDet: a plain ViT laid out as maps):
            # one level per block, as for token models.
            layout, reduction_, channels = maps[0]
            return [
                self._level(record, channels, reduction_, layout, index) for index, record in blocks
            ]
        first = self.records.index(blocks[0][1])
        container = f"{self.container}." if self.container else ""
        before = [
            (-1, r)
            for r in self.records[:first]
            if r.path and not r.path.startswith(container) and r.path != self.container
        ]
        # Per reduction, the last map that divides the input exactly; a padded map
        # (BiT's stem pads before pooling) only where no exact one exists.
        last_at: dict[int, tuple[bool, Level]] = {}
        height = self.size[0]
        for index, record in [*([] if tokens else before), *blocks]:
            found = read(record.output)
            if found is None:
                continue
            layout, reduction_, channels = found
            rows = record.output[1] if layout == "NHWC" else record.output[2]
            exact = height % reduction_ == 0 if layout == "tokens" else height % int(rows) == 0
            if exact or not last_at.get(reduction_, (False,))[0]:
                grid = "ceil" if layout == "tokens" else "exact"
                level = self._level(record, channels, reduction_, layout, index, grid=grid)
                last_at[reduction_] = (exact, level)
        return [level for _exact, level in sorted(last_at.values(), key=lambda c: c[1].reduction)]

    def node_levels(self, return_nodes: Sequence[str] | Mapping[str, str]) -> list[Level]:
        """``return_nodes`` as module paths: each module's output, as it returns it."""
        available = self.node_names()
        chosen = resolve_return_nodes(return_nodes, available, context=self.context)
        by_name = {_join(self.trunk_path, r.path): r for r in self.records}
        levels = []
        for name in available:
            if name not in chosen:
                continue
            record = by_name[name]
            found = (
                spatial(record.primary, self.size) if isinstance(record.primary, tuple) else None
            )
            channels = found[2] if found else (int(record.primary[-1]) if record.primary else 0)
            levels.append(
                Level(
                    chosen[name],
                    channels,
                    found[1] if found else 0,
                    "raw",
                    where=record.path,
                    block=self._block_of(record.path),
                    extra={"node": name},
                )
            )
        return levels

    def _block_of(self, path: str) -> int:
        """The index of the block a module is in (or after: the last), -1 before them."""
        if self.container is None:
            return -2
        prefix = f"{self.container}." if self.container else ""
        if path.startswith(prefix):
            head = path[len(prefix) :].split(".")[0]
            if head.isdigit():
                return int(head)
        blocks = self._block_records()
        first = self.records.index(blocks[0][1]) if blocks else 0
        position = next(i for i, r in enumerate(self.records) if r.path == path)
        return -1 if position < first else -2

    def final_modules(self) -> tuple[str, ...]:
        """Norm layers after the last block that keep its output's shape: the final
        norm (transformers' ``layernorm`` before ``last_hidden_state``)."""
        blocks = [record for _, record in self._block_records()]
        if not blocks:
            return ()
        last = self.records.index(blocks[-1])
        shape = blocks[-1].primary
        container_parts = (self.container or "").split(".")
        ancestors = {".".join(container_parts[:i]) for i in range(len(container_parts) + 1)}
        chain: list[str] = []
        after = self.records[last + 1 :]
        for i, record in enumerate(after):
            if record.path in ancestors:
                continue
            if any(record.path.startswith(f"{kept}.") for kept in chain):
                continue
            # Records come as modules finish, a module's children first: the norm
            # is judged as a whole (BiT's GroupNorm runs its activation inside).
            if any(record.path.startswith(f"{outer.path}.") for outer in after[i + 1 :]):
                continue
            if record.primary != shape or not is_norm(record.module):
                break
            chain.append(record.path)
        return tuple(chain)

    def after_blocks(self) -> tuple[str, ...]:
        """The modules that run after the last block, outermost ones (a final norm, a
        pooler, EfficientNet's head conv): what a cut model must not run."""
        blocks = [record for _, record in self._block_records()]
        if not blocks:
            return ()
        parts = (self.container or "").split(".")
        ancestors = {".".join(parts[:i]) for i in range(len(parts) + 1)}
        found: list[str] = []
        for record in self.records[self.records.index(blocks[-1]) + 1 :]:
            parent = record.path.rpartition(".")[0] if "." in record.path else ""
            if record.path not in ancestors and parent in ancestors and record.path not in found:
                found.append(record.path)
        return tuple(found)

    def shapes_by_name(self) -> dict[str, Any]:
        """What each module returns (its shape), by module path: what a level's
        ``where`` names."""
        return {record.path: record.output for record in self.records}

    def remeasure(self, changes_applied: nn.Module) -> list[_Record]:
        """The records of a dilated weightless copy of the trunk."""
        records, _ops = self._shape_pass(changes_applied, self.container)
        return records

    def plan(self, levels: Sequence[Level]) -> HookPlan:
        auto = all(level.layout != "raw" for level in levels)
        return HookPlan(
            trunk=self.trunk_path,
            container=self.container,
            convention=self.convention,
            levels=tuple(levels),
            final_modules=self.final_modules() if auto else (),
            after_blocks=self.after_blocks() if auto else (),
            native_size=self.size,
            channels=self.input_size[0],
        )


# -- the runner -------------------------------------------------------------------------

_CAPTURED: contextvars.ContextVar[dict[Any, Any] | None] = contextvars.ContextVar(
    "unifeat_captured", default=None
)
"""The tensors of the call in progress, per thread and per nested call."""


_STOP = "stop after"
"""The store's key for the level after which the call stops (see :class:`_Captured`)."""


class _Captured(Exception):
    """Ends a trunk's forward once its deepest wanted level is captured, for models
    whose code after the blocks cannot run with those modules skipped (it reads
    fields of their outputs: UVDoc's bridge, SAM 2's neck)."""


def _capture(
    index: int, where: Where, final: bool, module: nn.Module, args: Any, output: Any
) -> None:
    store = _CAPTURED.get()
    if store is None or index not in store:
        return
    store[index] = (level_tensor(output, where), first_tensor(output) if final else None, output)
    if store.get(_STOP) == index:
        raise _Captured


class _Skipped(nn.Module):
    """Stands in for what follows the blocks (pooler, heads): passes its input on."""

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x


@dataclass
class HookPlan:
    """What a hook runner needs (picklable data)."""

    trunk: str
    container: str | None
    convention: CallingConvention
    levels: tuple[Level, ...]
    final_modules: tuple[str, ...]
    after_blocks: tuple[str, ...]
    native_size: tuple[int, int]
    channels: int = 3
    """Input channels, for the probe that decides how a call ends."""


class HookRunner(Runner):
    """Runs the trunk with hooks on the level modules (see the module docstring)."""

    def __init__(self, plan: HookPlan, *, last_level: int, keep_final: bool = False) -> None:
        self._plan = plan
        self.levels = plan.levels
        self.last_level = last_level
        self._raw = any(level.layout == "raw" for level in plan.levels)
        self._keep_final = keep_final and bool(plan.final_modules)
        self._handles: list[Any] = []
        self.final_norm = final_norm_refusal(bool(plan.final_modules), keep_final)
        self._stops = False
        """Whether a call ends at its deepest level (see :meth:`_how_calls_end`)."""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = []  # the hooks live on the modules, which pickle them
        return state

    def make_root(self, source: nn.Module) -> nn.Module:
        """Prepare ``source`` (a copy that shares the caller's parameters): skip what
        no level needs, keep the blocks up to the deepest level, hook the levels."""
        plan = self._plan
        if plan.trunk:
            # Everything outside the trunk (task heads, a text tower) is unused.
            top = plan.trunk.split(".")[0]
            for name in [name for name, _ in source.named_children() if name != top]:
                setattr(source, name, _Skipped())
        if not self._runs_everything():
            self._skip_after_blocks(source)
        self._cut(source, self.last_level)
        self._how_calls_end(source)
        return source

    def _how_calls_end(self, root: nn.Module) -> None:
        """Whether the trunk's own code runs to its end with what follows the blocks
        skipped; where it does not (it reads fields of a skipped module's output),
        each call ends once its deepest wanted level is captured. Told by one call
        of a weightless replica on the meta device."""
        from unifeat._engine.meta import weightless

        if self._raw:
            return
        height, width = self._plan.native_size
        example = torch.empty(2, self._plan.channels, height, width, device="meta")
        indices = list(range(self.last_level + 1))
        self._stops = False
        try:
            with torch.no_grad():
                self.run(
                    weightless(root).module,
                    example,
                    indices,
                    final=True,
                    norm=False,
                    prefix_tokens=False,
                    context="",
                )
        except Exception:
            self._stops = True

    def level_module(self, index: int) -> str:
        return _join(self._plan.trunk, self.levels[index].where)

    def set_grad_checkpointing(self, root: nn.Module, enable: bool) -> int:
        from unifeat._engine.training import checkpoint_modules

        paths = [_join(self._plan.trunk, level.where) for level in self.levels]
        return checkpoint_modules(root, paths, enable)

    def _runs_everything(self) -> bool:
        """A model that keeps its last level runs its trunk to the end: the trunk's own
        output is then the final output (after its norm, pooler ignored)."""
        return self._raw or (self._keep_final and self.last_level == len(self.levels) - 1)

    def _skip_after_blocks(self, root: nn.Module) -> None:
        """What runs after the last block is cut out (it may not fit a cut model),
        but for a final norm that still applies, and for parameter-free modules (a
        pool whose output the trunk's own code reshapes)."""
        trunk = root.get_submodule(self._plan.trunk)
        keep = set(self._plan.final_modules) if self._norm_applies() else set()
        for path in self._plan.after_blocks:
            module = trunk.get_submodule(path)
            if path in keep or next(iter(module.parameters()), None) is None:
                continue
            parent, _, name = path.rpartition(".")
            setattr(trunk.get_submodule(parent), name, _Skipped())

    def _is_block(self, level: Level) -> bool:
        """A container child's own output (not a module inside a stage)."""
        container = self._plan.container
        return container is not None and level.where == _join(container, str(level.block))

    def _norm_applies(self) -> bool:
        """Whether the final norm still shapes the final output: always while the
        last level is computed; after pruning, where it fits the deepest level's
        width (plain ViT-likes, as timm does)."""
        if not self._keep_final:
            return False
        deepest, last = self.levels[self.last_level], self.levels[-1]
        return self.last_level == len(self.levels) - 1 or deepest.num_chs == last.num_chs

    def _blocks(self, root: nn.Module) -> nn.Module | None:
        if self._plan.container is None:
            return None
        return root.get_submodule(self._plan.trunk).get_submodule(self._plan.container)

    def _cut(self, root: nn.Module, last_level: int) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        plan = self._plan
        trunk = root.get_submodule(plan.trunk)
        container = self._blocks(root)
        levels = plan.levels[: last_level + 1]
        last_block = max((level.block for level in levels), default=-1)
        # Nodes picked by return_nodes run the whole trunk (what follows the blocks
        # may be picked too, and would not fit a cut block list): nothing is cut.
        cuttable = not self._raw and all(lv.block >= -1 for lv in levels)
        if container is not None and last_block >= -1 and cuttable:
            parent_path, _, attr = (plan.container or "").rpartition(".")
            parent = trunk.get_submodule(parent_path)
            blocks = list(container.children())
            if len(blocks) > last_block + 1:
                kept = blocks[: last_block + 1]
                cut = (
                    nn.Sequential(*kept)
                    if isinstance(container, nn.Sequential)
                    else nn.ModuleList(kept)
                )
                setattr(parent, attr, cut)
                if (
                    last_block >= 0
                    and levels[-1].block == last_block
                    and levels[-1].layout != "raw"
                ):
                    for name in plan.convention.block_tail:
                        if getattr(kept[last_block], name, None) is not None:
                            setattr(kept[last_block], name, None)
            container = self._blocks(root)
        if container is not None and plan.convention.block_kwargs:
            for block in container.children():
                self._handles.append(
                    block.register_forward_pre_hook(
                        functools.partial(_force_kwargs, plan.convention.block_kwargs),
                        with_kwargs=True,
                    )
                )
        for index, level in enumerate(levels):
            module = trunk.get_submodule(level.where)
            where = (
                plan.convention.block_output
                if level.block >= 0 and level.layout != "raw"
                else FIRST
            )
            self._handles.append(
                module.register_forward_hook(
                    functools.partial(_capture, index, where, index == last_level)
                )
            )

    def run(
        self,
        root: nn.Module,
        x: Tensor,
        indices: Sequence[int],
        *,
        final: bool,
        norm: bool,
        prefix_tokens: bool,
        context: str,
    ) -> tuple[list[FeatureMap], Tensor | None]:
        plan = self._plan
        # Sizes stay symbolic under torch.export (dynamic height and width).
        size = (x.shape[-2], x.shape[-1])
        wanted = set(indices)
        if final or norm:
            wanted.add(self.last_level)
        store: dict[Any, Any] = dict.fromkeys(wanted)
        stops = self._stops and not (final and self._runs_everything())
        if stops:
            store[_STOP] = max(wanted)
        token = _CAPTURED.set(store)
        resized = plan.convention.resize_keyword is not None and size != plan.native_size
        returned: Any = None
        try:
            args, kwargs = plan.convention.inputs(x, resized=resized)
            returned = root.get_submodule(plan.trunk)(*args, **kwargs)
        except _Captured:
            pass
        finally:
            _CAPTURED.reset(token)
        maps: list[FeatureMap] = []
        for index in indices:
            captured = store.get(index)
            if captured is None:
                raise UnsupportedOptionError(
                    f"level {index} ({self.levels[index].module!r}) of {context} did not run"
                )
            level = self.levels[index]
            if level.layout == "raw":
                maps.append(captured[2])
                continue
            tensor = captured[0]
            if plan.convention.reshape is not None and self._is_block(level):
                tensor = plan.convention.reshape(
                    root.get_submodule(plan.trunk), tensor, level.block, size
                )
            if norm and self._norm_fits(level):
                tensor = self._normed(root, tensor)
            maps.append(to_map(tensor, level, size, prefix_tokens=prefix_tokens, context=context))
        if not final:
            return maps, None
        if self._runs_everything() and returned is not None:
            whole = first_tensor(returned)
            if whole is not None:
                return maps, whole
        deepest = store[self.last_level]
        as_level = plan.convention.final_as_level or deepest[1] is None
        output = deepest[0] if as_level else deepest[1]
        if self._norm_applies():
            output = self._normed(root, output)
        return maps, output

    def _norm_fits(self, level: Level) -> bool:
        """The final norm takes what the last level is: a level as wide, laid out alike
        (every block of a plain ViT, the last stage of a Swin, BiT's last map)."""
        last = self.levels[-1]
        return level.layout == last.layout and level.num_chs == last.num_chs

    def _normed(self, root: nn.Module, tensor: Tensor) -> Tensor:
        trunk = root.get_submodule(self._plan.trunk)
        for path in self._plan.final_modules:
            norm = trunk.get_submodule(path)
            if (
                isinstance(norm, nn.LayerNorm)
                and tensor.dim() == 4
                and tuple(norm.normalized_shape) == (tensor.shape[1],)
            ):
                # A map read off tokens (a Swin stage): the norm runs over its channels.
                tensor = norm(tensor.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            else:
                tensor = norm(tensor)
        return tensor

    def prune(
        self,
        root: nn.Module,
        last_level: int,
        *,
        drop_final: bool,
        indices: Sequence[int] = (),
    ) -> nn.Module:
        self.last_level = last_level
        if drop_final:
            self._keep_final = False
            self.final_norm = "its final norm was pruned"
        if not self._runs_everything():
            self._skip_after_blocks(root)
        self._cut(root, last_level)
        return root


def unknown_layout(context: str, types: Sequence[str]) -> UnsupportedOptionError:
    return UnsupportedOptionError(
        f"{context}: unifeat reads levels off plain token models and maps; tested layouts "
        f"include {format_choices(types)}"
    )
