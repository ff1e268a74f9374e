"""Each input is checked once per call: ``dd.ms_deform_attn`` and a model layer (``MSDeformAttn``) look the level
tables up once per call, and the tables' values are read once per table, by one checker: the compiled CPU op in
C++ (``_C.table_reads()``) when it runs the call, else ``levels._read_host_levels`` — once per call only for
tables that cannot be cached (inference tensors). Counted, not timed."""

from __future__ import annotations

import pytest
import torch
from support.oracle import make_inputs

import deformable_detr as dd
from deformable_detr._extension import extension_loaded
from deformable_detr.models.deformable_transformer import DeformableTransformer
from deformable_detr.ops import levels


def _cxx_reads() -> int:
    """Table reads of the compiled CPU op so far (0 without the extension: nothing else reads in C++)."""
    if not extension_loaded():
        return 0
    from deformable_detr import _C

    return _C.table_reads()


SHAPES = [(4, 3), (2, 2), (1, 1)]


class _CountingCache(dict):
    """The level-table cache, counting its probes (every way of asking it for an entry)."""

    probes = 0

    def get(self, key, default=None):
        self.probes += 1
        return super().get(key, default)

    def __getitem__(self, key):
        self.probes += 1
        return super().__getitem__(key)

    def __contains__(self, key):
        self.probes += 1
        return super().__contains__(key)


class Counts:
    """Cache probes of the Python lookup, and value reads in Python and C++ together (``reads``)."""

    def __init__(self, monkeypatch):
        self.cache = _CountingCache()
        self.python_reads = 0
        self.cxx_start = _cxx_reads()
        read = levels._read_host_levels

        def counting_read(*args, **kwargs):
            self.python_reads += 1
            return read(*args, **kwargs)

        monkeypatch.setattr(levels, "_CACHE", self.cache)
        monkeypatch.setattr(levels, "_read_host_levels", counting_read)

    @property
    def probes(self) -> int:
        return self.cache.probes

    @property
    def cxx_reads(self) -> int:
        return _cxx_reads() - self.cxx_start

    @property
    def reads(self) -> int:
        return self.python_reads + self.cxx_reads

    def reset(self) -> None:
        self.cache.probes = 0
        self.python_reads = 0
        self.cxx_start = _cxx_reads()


@pytest.fixture
def counts(monkeypatch):
    return Counts(monkeypatch)


def _op_inputs():
    return make_inputs(2, SHAPES, 2, 4, 5, 2, seed=3)


def _layer_inputs():
    torch.manual_seed(0)
    n_levels = len(SHAPES)
    layer = dd.MSDeformAttn(d_model=8, n_levels=n_levels, n_heads=2, n_points=2)
    S = sum(h * w for h, w in SHAPES)
    query, reference = torch.randn(2, 5, 8), torch.rand(2, 5, n_levels, 2)
    return layer, (query, reference, torch.randn(2, S, 8))


def _tables():
    starts, start = [], 0
    for h, w in SHAPES:
        starts.append(start)
        start += h * w
    return torch.tensor(SHAPES), torch.tensor(starts)


BACKENDS = dd.available_backends("cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_looks_the_tables_up_once_per_call_and_reads_them_once(counts, backend):
    value, ss, lsi, loc, attn = _op_inputs()
    dd.ms_deform_attn(value, ss, lsi, loc, attn, backend=backend)
    assert (counts.probes, counts.reads) == (1, 1)
    # one checker: C++ when the compiled CPU op runs the call, Python otherwise
    assert counts.cxx_reads == (1 if backend == "cpu" else 0)
    counts.reset()
    dd.ms_deform_attn(value, ss, lsi, loc, attn, backend=backend)  # the same tables: a cache hit, no value read
    assert (counts.probes, counts.reads) == (1, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_and_backward_read_the_tables_once(counts, dtype):
    """The backward gets the forward's tables: recognised, not read again (fp16 widens to the fp32 kernel
    without re-entering the checks)."""
    value, ss, lsi, loc, attn = _op_inputs()
    value = value.to(dtype).requires_grad_(True)
    loc, attn = loc.float().requires_grad_(True), attn.float()
    dd.ms_deform_attn(value, ss, lsi, loc, attn).sum().backward()
    assert counts.reads == 1


def test_layer_looks_the_tables_up_once_per_call_and_reads_them_once(counts):
    layer, (query, reference, flat) = _layer_inputs()
    ss, lsi = _tables()
    layer(query, reference, flat, ss, lsi)
    assert (counts.probes, counts.reads) == (1, 1)
    counts.reset()
    layer(query, reference, flat, ss, lsi)
    assert (counts.probes, counts.reads) == (1, 0)


def test_uncacheable_tables_are_read_once_per_call(counts):
    """Inference tensors have no version counter, so their values are read on every call: once per call."""
    value, ss, lsi, loc, attn = _op_inputs()
    layer, (query, reference, flat) = _layer_inputs()
    with torch.inference_mode():
        ss_i, lsi_i = ss.clone(), lsi.clone()
        for _ in range(2):
            counts.reset()
            dd.ms_deform_attn(value, ss_i, lsi_i, loc, attn)
            assert counts.reads == 1
            counts.reset()
            layer(query, reference, flat, ss_i, lsi_i)
            assert counts.reads == 1


def test_layer_result_is_unchanged_by_the_single_lookup():
    """The layer's (W_l, H_l) normalizer and the op's tables come from the one lookup: same output as the
    direct formula of the original module."""
    layer, (query, reference, flat) = _layer_inputs()
    ss, lsi = _tables()
    out = layer(query, reference, flat, ss, lsi)
    N, Len_q, _ = query.shape
    M, L, P = layer.n_heads, layer.n_levels, layer.n_points
    offsets = layer.sampling_offsets(query).view(N, Len_q, M, L, P, 2)
    normalizer = torch.stack([ss[:, 1], ss[:, 0]], -1).to(query.dtype)
    locations = reference[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    weights = layer.attention_weights(query).view(N, Len_q, M, L * P).softmax(-1).view(N, Len_q, M, L, P)
    value = layer.value_proj(flat).view(N, flat.shape[1], M, -1)
    expected = layer.output_proj(dd.ms_deform_attn_reference(value, ss, lsi, locations, weights))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_transformer_looks_the_tables_up_once_per_layer_call(counts):
    torch.manual_seed(0)
    model = DeformableTransformer(
        d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=32, dropout=0.0,
        num_feature_levels=len(SHAPES), dec_n_points=2, enc_n_points=2,
    ).eval()  # fmt: skip
    srcs = [torch.randn(1, 16, h, w) for h, w in SHAPES]
    pos = [torch.randn_like(s) for s in srcs]
    query_embed = torch.randn(4, 32)
    layer_calls = 2 + 3
    with torch.no_grad():
        model(srcs, None, pos, query_embed)  # unpadded: the model's per-size tables, read once
        assert (counts.probes, counts.reads) == (layer_calls, 1)
        counts.reset()
        model(srcs, None, pos, query_embed)
        assert (counts.probes, counts.reads) == (layer_calls, 0)
        masks = [torch.zeros(1, h, w, dtype=torch.bool) for h, w in SHAPES]
        counts.reset()
        model(srcs, masks, pos, query_embed)  # padded: fresh tables per forward, read once
        assert (counts.probes, counts.reads) == (layer_calls, 1)


needs_extension = pytest.mark.skipif(not extension_loaded(), reason="compiled extension not built")


@needs_extension
def test_raw_op_checks_a_table_once_and_again_after_an_edit(counts):
    value, ss, lsi, loc, attn = _op_inputs()
    op = torch.ops.deformable_detr.ms_deform_attn
    op(value, ss, lsi, loc, attn)
    op(value, ss, lsi, loc, attn)
    assert counts.cxx_reads == 1
    lsi[1] += 1  # an in-place write moves the version counter: read and refused
    with pytest.raises(ValueError, match="level_start_index"):
        op(value, ss, lsi, loc, attn)
    lsi[1] -= 1
    op(value, ss, lsi, loc, attn)
    assert counts.cxx_reads == 3
    with pytest.raises(ValueError, match="spatial_shapes"):  # a known table still meets every value's S
        op(value[:, :-1], ss, lsi, loc, attn)
    assert counts.cxx_reads == 3


@needs_extension
def test_raw_op_reads_inference_tables_on_every_call(counts):
    value, ss, lsi, loc, attn = _op_inputs()
    with torch.inference_mode():
        ss_i, lsi_i = ss.clone(), lsi.clone()  # no version counter: not recognisable
    for calls in (1, 2):
        torch.ops.deformable_detr.ms_deform_attn(value, ss_i, lsi_i, loc, attn)
        assert counts.cxx_reads == calls


@needs_extension
def test_raw_op_is_not_fooled_by_a_reused_address(counts):
    """The C++ entry holds weak references: a dead table's address is not reused while it is remembered, so a
    fresh bad table is read and refused, never taken for the checked one."""
    value, ss, lsi, loc, attn = _op_inputs()
    op = torch.ops.deformable_detr.ms_deform_attn
    op(value, ss, lsi, loc, attn)
    del ss
    for _ in range(50):
        bad = torch.tensor([(5, 3), (2, 2), (1, 1)])
        with pytest.raises(ValueError, match="spatial_shapes"):
            op(value, bad, lsi, loc, attn)


@needs_extension
def test_unseen_edit_of_a_checked_table_never_reads_outside_value(counts):
    """A write that bypasses the version counter (a numpy view) is not seen by the once-per-table check; the
    kernels bound every level to [0, S) (read_level), so the result is finite and computed in bounds: a level
    pushed past S reads as empty, exactly as the oracle of the same call with that level's points removed."""
    value, ss, lsi, loc, attn = _op_inputs()
    op = torch.ops.deformable_detr.ms_deform_attn
    op(value, ss, lsi, loc, attn)
    ss.numpy()[0] = (4000, 3000)  # level 0 now claims 12 M positions of a 17-position value
    out = op(value, ss, lsi, loc, attn)
    assert counts.cxx_reads == 1
    ss.numpy()[0] = SHAPES[0]
    no_level0 = attn.clone()
    no_level0[:, :, :, 0] = 0
    torch.testing.assert_close(out, op(value, ss, lsi, loc, no_level0))
