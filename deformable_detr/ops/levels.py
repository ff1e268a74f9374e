"""Level tables (``spatial_shapes``, ``level_start_index``) checked once per table instead of once per call.

Checking the tables' values (non-negative sizes, starts = cumulative H*W, sum = S) and converting them (int32 ->
int64, CPU -> the value's device) is what made the op wrapper cost ~6x the raw op on small inputs. A model
passes the same two tensors to every layer, so the result is cached, keyed by the tensors' identity and their
version counters:

- identity: ``id()`` plus a weak reference that must still point at the same tensor (an ``id`` can be reused
  after the tensor dies; its weak reference is then dead and the entry no longer matches);
- contents: ``Tensor._version`` is bumped by every in-place write (``t[0] = 5``, ``t.add_(1)``, ``copy_``),
  so an edited table is checked again. Writes that bypass version counting (through ``t.data`` or raw storage)
  are not seen; every kernel bounds its level reads to [0, S) (``read_level`` in C++, the Triton kernels' level
  guard), so such a table gives wrong sums, never a read outside ``value``.

Who reads the values: one checker per call. A call that runs the compiled CPU op leaves the values to that op,
which checks each table once in C++ with the same identity/version rule (``_C.table_reads()`` counts its reads);
every other call (CUDA, Triton, the reference, a lookup without a device) has them read and checked here, once
per table (:meth:`LevelTable.check`).

Tables that cannot be keyed safely (inference-mode tensors, which have no version counter; tensor subclasses;
meta tensors) are checked on every call the same way, with host reads only of CPU tables (``tolist``, no tensor
math). Under ``torch.compile`` nothing is cached and no value is read: the graph converts with ``.to``.

On CUDA nothing here synchronises: values are read only from CPU tables, and a CPU table's device copy is made
once, from pinned memory, without blocking.
"""

from __future__ import annotations

import weakref

import torch

_MAX_ENTRIES = 64
_INDEX_DTYPES = (torch.int64, torch.int32)


def _read_host_levels(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, S: int) -> list | None:
    """Check a CPU table's values (sizes, then the total, then the starts); returns the host rows, or None when
    the shapes live on a device (not readable without a sync, or no data at all for meta tensors)."""
    if spatial_shapes.device.type != "cpu":
        return None
    shapes = spatial_shapes.tolist()
    if any(h < 0 or w < 0 for h, w in shapes):
        raise ValueError(f"ms_deform_attn: spatial_shapes must be non-negative, got {shapes}")
    total = sum(h * w for h, w in shapes)
    if total != S:
        raise ValueError(
            f"ms_deform_attn: sum of H*W over spatial_shapes ({total}) must equal value.shape[1] (S = {S})"
        )
    if level_start_index.device.type == "cpu":
        expected, start = [], 0
        for h, w in shapes:
            expected.append(start)
            start += h * w
        starts = level_start_index.tolist()
        if starts != expected:
            raise ValueError(f"ms_deform_attn: level_start_index must be {expected} (cumulative H*W), got {starts}")
    return shapes


def _to_index(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` as int64 on ``device``; ``t`` itself when it already is (no copy)."""
    if t.dtype is torch.int64 and t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        # A pageable host->device copy would block the host; a pinned, non-blocking one does not.
        return t.to(torch.int64).pin_memory().to(device, non_blocking=True)
    return t.to(device=device, dtype=torch.int64)


class LevelTable:
    """One (spatial_shapes, level_start_index) pair: whether its values were checked here (``checked``; the host rows
    ``host`` of a CPU table once read), its total size, and the converted copies / offset normalizers made so far.
    :func:`lookup` hands it out; a caller that needs both the normalizer and the op (``MSDeformAttn``) passes it on
    instead of looking the pair up again."""

    __slots__ = (
        "shapes_ref", "starts_ref", "shapes_version", "starts_version", "checked", "total", "host", "copies", "norms",
    )  # fmt: skip

    def __init__(self):
        self.host = self.total = None
        self.checked = False
        self.shapes_ref = self.starts_ref = None
        self.copies: dict = {}
        self.norms: dict = {}

    def check(self, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, S: int) -> None:
        """Read and check a CPU table's values, once (ValueError naming the argument; a failed check is not
        remembered); a device table is not read here (the kernels bound its reads)."""
        if self.checked:
            self.check_total(S)
            return
        self.host = _read_host_levels(spatial_shapes, level_start_index, S)
        self.total = None if self.host is None else S
        self.checked = True

    def matches(self, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor) -> bool:
        return (
            self.shapes_ref() is spatial_shapes
            and self.starts_ref() is level_start_index
            and self.shapes_version == spatial_shapes._version
            and self.starts_version == level_start_index._version
        )

    def check_total(self, S: int) -> None:
        if self.total is not None and self.total != S:
            raise ValueError(
                f"ms_deform_attn: sum of H*W over spatial_shapes ({self.total}) must equal value.shape[1] (S = {S})"
            )

    def on(self, device: torch.device, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor):
        """The tables as int64 on ``device`` (the tensors themselves when they already are)."""
        if (
            spatial_shapes.dtype is torch.int64
            and level_start_index.dtype is torch.int64
            and spatial_shapes.device == device
            and level_start_index.device == device
        ):
            return spatial_shapes, level_start_index
        if torch.compiler.is_compiling():
            return spatial_shapes.to(device=device, dtype=torch.int64), level_start_index.to(
                device=device, dtype=torch.int64
            )
        pair = self.copies.get(device)
        if pair is None:
            # Outside inference mode: a copy made under torch.inference_mode() may serve a later training step.
            with torch.inference_mode(False):
                pair = (_to_index(spatial_shapes, device), _to_index(level_start_index, device))
            if self.shapes_ref is not None:
                self.copies[device] = pair
        return pair

    def normalizer(self, spatial_shapes: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(L, 2) rows (W_l, H_l) in ``dtype`` on ``device``: what ``MSDeformAttn`` divides pixel offsets by."""
        if torch.compiler.is_compiling():
            return torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(device=device, dtype=dtype)
        norm = self.norms.get((device, dtype))
        if norm is None:
            with torch.inference_mode(False):
                norm = self._normalizer(spatial_shapes, device, dtype)
            if self.shapes_ref is not None:
                self.norms[(device, dtype)] = norm
        return norm

    def _normalizer(self, spatial_shapes: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if self.host is not None:
            norm = torch.tensor([(w, h) for h, w in self.host], dtype=dtype).reshape(-1, 2)
            return norm.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else norm.to(device)
        return torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(device=device, dtype=dtype)


# Under torch.compile: no value is read and nothing is cached (the methods convert in the graph).
_TRACED = LevelTable()
_TRACED.checked = True

_CACHE: dict[tuple[int, int], LevelTable] = {}


def _cacheable(t: torch.Tensor) -> bool:
    return type(t) is torch.Tensor and not t.is_inference() and t.device.type != "meta"


def lookup(
    spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, S: int, device: torch.device | None = None
) -> LevelTable:
    """The table of the pair for a value with S = ``value.shape[1]`` positions on ``device``: one cache probe. Its
    values are read and checked here (ValueError naming the argument) when the pair is new, edited or cannot be
    cached, unless ``device`` is the CPU: a CPU call leaves the check to the op that runs (the compiled CPU op
    checks in C++; any other backend calls :meth:`LevelTable.check` in the op wrapper)."""
    if torch.compiler.is_compiling():
        return _TRACED
    key = (id(spatial_shapes), id(level_start_index))
    entry = _CACHE.get(key)
    if entry is None or not entry.matches(spatial_shapes, level_start_index):
        entry = LevelTable()
        if _cacheable(spatial_shapes) and _cacheable(level_start_index):
            entry.shapes_ref, entry.starts_ref = weakref.ref(spatial_shapes), weakref.ref(level_start_index)
            entry.shapes_version, entry.starts_version = spatial_shapes._version, level_start_index._version
            _CACHE.pop(key, None)
            if len(_CACHE) >= _MAX_ENTRIES:
                del _CACHE[next(iter(_CACHE))]
            _CACHE[key] = entry
    if device is None or device.type != "cpu":
        entry.check(spatial_shapes, level_start_index, S)
    return entry


# --- point tables (``points_per_level``): (L,) counts P_l -> (L+1,) int64 starts, checked once per table.


class PointTable:
    """One checked ``points_per_level``: ``counts`` (host tuple of P_l), ``uniform`` (P when every P_l is equal
    and L > 0, else None: such a call runs the 6-D layout) and ``start_on(device)``, the (L+1,) int64 table
    ``[0, P_0, P_0 + P_1, ..., K]`` the kernels read (made once per device)."""

    __slots__ = ("counts", "uniform", "host_starts", "starts", "__weakref__")

    def __init__(self, counts: tuple):
        self.counts = counts
        self.uniform = counts[0] if counts and all(p == counts[0] for p in counts) else None
        starts, total = [0], 0
        for p in counts:
            total += p
            starts.append(total)
        self.host_starts = starts
        self.starts: dict = {}

    def start_on(self, device: torch.device) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a graph constant, nothing cached
            return torch.tensor(self.host_starts, dtype=torch.int64, device=device)
        t = self.starts.get(device)
        if t is None:
            with torch.inference_mode(False):
                t = torch.tensor(self.host_starts, dtype=torch.int64)
                t = t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)
            self.starts[device] = t
        return t


_POINT_TABLES: dict[tuple, PointTable] = {}
# Tensor tables: id -> (weak reference, version, counts) so a device table is read (a sync) once.
_POINT_TENSORS: dict[int, tuple] = {}


def _point_counts(points_per_level, L: int) -> tuple:
    """The counts as a tuple of Python ints, with TypeError/ValueError naming ``points_per_level``."""
    if isinstance(points_per_level, torch.Tensor):
        if points_per_level.dtype not in _INDEX_DTYPES:
            raise TypeError(
                f"ms_deform_attn: points_per_level must be an int64 (or int32) tensor, got {points_per_level.dtype}"
            )
        if points_per_level.dim() != 1:
            raise ValueError(
                f"ms_deform_attn: points_per_level must have shape (L,) = ({L},), got {tuple(points_per_level.shape)}"
            )
        if points_per_level.device.type == "meta":
            raise ValueError("ms_deform_attn: points_per_level cannot be a meta tensor (its values set the layout)")
        counts = tuple(points_per_level.tolist())
    elif isinstance(points_per_level, (list, tuple)):
        counts = []
        for p in points_per_level:
            if isinstance(p, bool) or not isinstance(p, int):
                try:
                    p = int(p.__index__())  # numpy / 0-d integer tensors
                except (AttributeError, TypeError):
                    raise TypeError(
                        f"ms_deform_attn: points_per_level must hold integers, got {type(p).__name__} in "
                        f"{list(points_per_level)!r}"
                    ) from None
            counts.append(p)
        counts = tuple(counts)
    else:
        raise TypeError(
            "ms_deform_attn: points_per_level must be a sequence of L ints or an (L,) int64 tensor, got "
            f"{type(points_per_level).__name__}"
        )
    if len(counts) != L:
        raise ValueError(
            f"ms_deform_attn: points_per_level must have L = {L} entries (one per spatial_shapes row), got "
            f"{len(counts)}: {list(counts)}"
        )
    if any(p < 0 for p in counts):
        raise ValueError(f"ms_deform_attn: points_per_level must be non-negative, got {list(counts)}")
    return counts


def _tensor_counts(points_per_level: torch.Tensor, L: int) -> tuple:
    if not _cacheable(points_per_level):
        return _point_counts(points_per_level, L)
    key = id(points_per_level)
    entry = _POINT_TENSORS.get(key)
    if entry is not None and entry[0]() is points_per_level and entry[1] == points_per_level._version:
        counts = entry[2]
        if len(counts) == L:
            return counts
    counts = _point_counts(points_per_level, L)
    if len(_POINT_TENSORS) >= _MAX_ENTRIES:
        del _POINT_TENSORS[next(iter(_POINT_TENSORS))]
    _POINT_TENSORS[key] = (weakref.ref(points_per_level), points_per_level._version, counts)
    return counts


def prepare_points(points_per_level, L: int, K: int) -> PointTable:
    """The checked point table of ``points_per_level`` (a length-L sequence or (L,) int tensor, P_l >= 0,
    sum = K, the sampling_locations' point dimension). Sequences are keyed by value, tensors by identity and
    version counter (as the level tables), so a model passing the same table to every layer checks it once."""
    if isinstance(points_per_level, torch.Tensor) and not torch.compiler.is_compiling():
        counts = _tensor_counts(points_per_level, L)
    else:
        counts = _point_counts(points_per_level, L)
    if sum(counts) != K:
        raise ValueError(
            f"ms_deform_attn: points_per_level must sum to K = {K} (sampling_locations.shape[3]), got "
            f"{list(counts)} (sum {sum(counts)})"
        )
    if torch.compiler.is_compiling():
        return PointTable(counts)
    table = _POINT_TABLES.get(counts)
    if table is None:
        if len(_POINT_TABLES) >= _MAX_ENTRIES:
            del _POINT_TABLES[next(iter(_POINT_TABLES))]
        table = _POINT_TABLES[counts] = PointTable(counts)
    return table
