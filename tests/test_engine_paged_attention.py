"""Paged decode attention (pipeline/engine/backends/paged.py, paged_triton.py) against float64 dense
attention over each row's gathered keys, with and without shared-prefix (cascade) groups.

The Triton kernels run here through Triton's interpreter (TRITON_INTERPRET=1, set by conftest where
there is no GPU) on small shapes; bench/paged_attention.py checks them again on the H200 in bf16.
Unreferenced pool slots hold NaN: a kernel that reads a key it should not turns the output NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from pipeline.engine.attention import dense_reference
from pipeline.engine.backends import paged
from pipeline.engine.config import alibi_slopes
from pipeline.engine.metadata import CascadeMeta

pytestmark = pytest.mark.usefixtures("engine_single_thread")


@dataclass
class Case:
    q: torch.Tensor  # [B, H, D]
    k_pool: torch.Tensor  # [num_blocks, bs, H, D]
    v_pool: torch.Tensor
    tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    slopes: torch.Tensor
    cascade: CascadeMeta | None
    scale: float


def make_case(
    bs: int, *, h: int = 4, d: int = 16, seed: int = 0, bias_max: int = 8, dtype: torch.dtype = torch.float32,
    groups: tuple[tuple[int, tuple[int, ...]], ...] = ((2, (0, 2, 3)), (0, ()), (1, (4,))),
    own: tuple[int, ...] = (5, 3 * 16 + 7, 1, 0, 16 * 9, 2),  # keys past the row's prefix, per row
    max_blocks: int = 12,
) -> Case:
    """`groups`: (prefix blocks, rows) per group slot ((0, ()) = an empty slot). Rows in no group
    attend their `own` keys alone; grouped rows see prefix + own keys (own 0: the query is the
    prefix's last key). Block ids are shuffled, so no table is one ascending run."""
    g = torch.Generator().manual_seed(seed)
    b = len(own)
    row_prefix = [0] * b
    row_group = [-1] * b
    for gi, (n_blocks, rows) in enumerate(groups):
        for r in rows:
            row_prefix[r], row_group[r] = n_blocks, gi
    own_blocks = [-(-max(own[r], 0 if row_prefix[r] else 1) // bs) for r in range(b)]
    needed = sum(nb for nb, _ in groups) + sum(own_blocks) + 3
    perm = torch.randperm(needed, generator=g).tolist()
    poison = perm.pop()  # padding entries of every table point at a block of NaN
    prefix_ids = [[perm.pop() for _ in range(nb)] for nb, _ in groups]
    k_pool, v_pool = (torch.randn(needed, bs, h, d, generator=g) * 2 for _ in range(2))
    tables = torch.full((b, max_blocks), poison, dtype=torch.int32)
    seq_lens = []
    for r in range(b):
        ids = (prefix_ids[row_group[r]] if row_group[r] >= 0 else []) + [perm.pop() for _ in range(own_blocks[r])]
        n = max(row_prefix[r] * bs + own[r], 1)
        tables[r, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        seq_lens.append(n)
        if n % bs:  # slots past the row's last key in its last block: never read
            k_pool[ids[-1], n % bs :] = math.nan
            v_pool[ids[-1], n % bs :] = math.nan
    for unused in [poison, *perm]:
        k_pool[unused], v_pool[unused] = math.nan, math.nan
    n_groups = len(groups)
    max_group = max(2, max(len(rows) for _, rows in groups))
    ptab = torch.zeros(n_groups, max_blocks, dtype=torch.int32)
    plen = torch.zeros(n_groups, dtype=torch.int32)
    grows = torch.full((n_groups, max_group), -1, dtype=torch.int32)
    for gi, (nb, rows) in enumerate(groups):
        ptab[gi, :nb] = torch.tensor(prefix_ids[gi], dtype=torch.int32)
        plen[gi] = nb * bs if rows else 0
        grows[gi, : len(rows)] = torch.tensor(rows, dtype=torch.int32)
    cascade = CascadeMeta(prefix_block_tables=ptab, prefix_lens=plen,
                          row_group=torch.tensor(row_group, dtype=torch.int32), group_rows=grows)
    q = torch.randn(b, h, d, generator=g)
    return Case(q.to(dtype), k_pool.to(dtype), v_pool.to(dtype), tables, torch.tensor(seq_lens, dtype=torch.int32),
                alibi_slopes(h, bias_max), cascade, 1 / math.sqrt(d))


def reference(case: Case) -> torch.Tensor:
    """Float64 ordinary ALiBi attention of each row over its gathered keys [0, seq_len): [B, H, D]."""
    bs = case.k_pool.shape[1]
    rows = []
    for r, n in enumerate(case.seq_lens.tolist()):
        ids = case.tables[r, : -(-n // bs)].long()
        k = case.k_pool[ids].flatten(0, 1)[:n].double()  # [n, H, D]
        v = case.v_pool[ids].flatten(0, 1)[:n].double()
        rows.append(dense_reference(case.q[r][None, None].double(), k[None], v[None], case.slopes,
                                    scale=case.scale)[0, 0])
    return torch.stack(rows)


def run_torch(case: Case, cascade: bool) -> torch.Tensor:
    return paged.torch_decode(case.q, case.k_pool, case.v_pool, case.tables, case.seq_lens, case.slopes,
                              scale=case.scale, cascade=case.cascade if cascade else None)


@pytest.mark.parametrize("bs", [16, 64, 128])
@pytest.mark.parametrize("cascade", [False, True])
def test_torch_paged_decode_matches_float64(bs, cascade, monkeypatch):
    monkeypatch.setattr(paged, "CHUNK_KEYS", 2 * bs)  # several chunks per row: the online merge runs
    case = make_case(bs, seed=bs, bias_max=16)
    out = run_torch(case, cascade)
    assert out.shape == case.q.shape and out.dtype == case.q.dtype and not out.isnan().any()
    torch.testing.assert_close(out.double(), reference(case), rtol=1e-5, atol=1e-5)


def test_torch_cascade_with_steep_slopes_and_long_prefix():
    """Slopes up to 1/2 per key over a prefix of 32 blocks: far keys underflow, the near ones decide;
    biases relative to the prefix end keep those near keys exact in float32."""
    case = make_case(16, h=8, bias_max=8, seed=3, groups=((32, (0, 1, 2)),), own=(1, 40, 0), max_blocks=40)
    torch.testing.assert_close(run_torch(case, True).double(), reference(case), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run_torch(case, True), run_torch(case, False), rtol=1e-5, atol=1e-5)


def test_decode_dispatches_to_the_torch_path_off_cuda():
    case = make_case(16, seed=7)
    out = paged.decode(case.q, case.k_pool, case.v_pool, case.tables, case.seq_lens, case.slopes,
                       scale=case.scale, cascade=case.cascade)
    assert torch.equal(out, run_torch(case, True))


def test_gather_is_a_view_for_consecutive_blocks_and_a_copy_otherwise():
    pool = torch.randn(10, 4, 2, 3)  # [blocks, bs, H, D]
    view = paged.gather(pool, [3, 4, 5], 10)
    assert view.shape == (10, 2, 3) and view.data_ptr() == pool[3].data_ptr()
    assert torch.equal(view, pool[3:6].flatten(0, 1)[:10])
    assert paged.gather(pool, torch.tensor([3, 4, 5, 9]), 12).data_ptr() == pool[3].data_ptr()  # extra ids unused
    copy = paged.gather(pool, [7, 2], 6)
    assert copy.data_ptr() != pool[7].data_ptr()
    assert torch.equal(copy, torch.cat([pool[7], pool[2, :2]]))
    with pytest.raises(ValueError):
        paged.gather(pool, [1], 5)


def test_write_puts_each_token_in_its_slot_only():
    k_pool, v_pool = torch.zeros(2, 2, 5, 2, 3)  # [blocks, bs, H, D] each
    k, v = torch.randn(2, 3, 2, 3)  # [N, H, D] each
    slots = torch.tensor([7, 0, 9])  # block 1 offset 2, block 0 offset 0, block 1 offset 4
    paged.write(k_pool, v_pool, k, v, slots)
    assert torch.equal(k_pool[1, 2], k[0]) and torch.equal(k_pool[0, 0], k[1]) and torch.equal(v_pool[1, 4], v[2])
    assert int((k_pool != 0).flatten(0, 1).any(-1).any(-1).sum()) == 3
    with pytest.raises(RuntimeError):  # a non-contiguous pool has no flat view to write through
        paged.write(k_pool.transpose(0, 1), v_pool.transpose(0, 1), k, v, slots)


# --- Triton kernels through the interpreter ------------------------------------------------------------


@pytest.fixture
def interpreted_paged(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # before triton's first import: it is read then too
    pytest.importorskip("triton")
    from pipeline.engine.backends import paged_triton

    paged_triton._kernels.cache_clear()
    paged_triton._counters.clear()
    yield paged_triton
    paged_triton._kernels.cache_clear()
    paged_triton._counters.clear()


def small_config(pt: object, **kw: int) -> object:
    """Tiles of 16 and tiny splits: ~4 splits per row (6 rows x 2 heads) and per prefix, so with
    MERGE_CHUNK 4 the merge runs its multi-chunk loop; small grids keep the interpreter quick."""
    base = dict(block_n=16, target_programs=48, min_keys=16, num_stages=2, prefix_block_n=16,
                prefix_target=8, prefix_min_keys=16, prefix_stages=2, max_rows=16)
    return pt.PagedConfig(**{**base, **kw})  # type: ignore[attr-defined]


def run_triton(pt: object, case: Case, cascade: bool, **kw: int) -> torch.Tensor:
    return pt.decode(case.q, case.k_pool, case.v_pool, case.tables, case.seq_lens, case.slopes,  # type: ignore[attr-defined]
                     scale=case.scale, cascade=case.cascade if cascade else None, config=small_config(pt, **kw))


@pytest.mark.parametrize(("bs", "cascade"), [(16, True), (64, True), (32, False)])
def test_triton_paged_decode_matches_float64(interpreted_paged, monkeypatch, bs, cascade):
    pt = interpreted_paged
    monkeypatch.setattr(pt, "MERGE_CHUNK", 4)
    case = make_case(bs, h=2, seed=bs + 1, bias_max=16)
    ref = reference(case)
    for _ in range(2 if bs == 16 else 1):  # a second call sees the counters the first left (all zero)
        out = run_triton(pt, case, cascade)
        assert out.shape == case.q.shape and out.dtype == case.q.dtype
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert not pt._counters[case.q.device].any()


def test_triton_cascade_row_chunks_and_few_splits(interpreted_paged):
    """18 rows in one group with 16 rows per program: two row chunks each read the prefix; one split
    per row (target 1 program) so each program walks its whole range."""
    pt = interpreted_paged
    own = tuple([3, 17, 0, 40, 1, 9] * 3)
    case = make_case(16, h=2, seed=11, groups=((3, tuple(range(18))),), own=own, max_blocks=8)
    out = run_triton(pt, case, True, target_programs=1, prefix_target=1)
    torch.testing.assert_close(out.double(), reference(case), rtol=1e-5, atol=1e-5)


def test_triton_bf16_pool_is_within_bf16_rounding(interpreted_paged):
    """The per-row kernel on bf16 pools. The prefix kernel's bf16 tl.dot is checked on the H200
    (bench/paged_attention.py): Triton 3.9's interpreter returns garbage for bf16 tl.dot operands."""
    pt = interpreted_paged
    case = make_case(32, h=2, seed=5, bias_max=8, dtype=torch.bfloat16)
    out = run_triton(pt, case, False)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference(case), rtol=2e-2, atol=2e-2)


def test_grid_sizes_come_from_shapes_and_cover_every_key():
    from pipeline.engine.backends import paged_triton as pt

    cfg = pt.PagedConfig()
    one_long = pt.grid_sizes(1, 32, 65536, 0, 0, 0, cfg)
    assert one_long["splits"] * cfg.min_keys <= 65536 and one_long["prefix_splits"] == 0
    batch = pt.grid_sizes(32, 32, 65536, 16, 32, 65536, cfg)
    assert batch["splits"] == 1 and batch["rows"] == 32 and batch["chunks"] == 1
    assert batch["prefix_splits"] * 32 == 1024  # one live group alone keeps the chip busy
    assert pt.grid_sizes(8, 32, 65536, 4, 8, 65536, cfg)["prefix_splits"] * 32 == 512  # 16 rows per program
    wide = pt.grid_sizes(64, 32, 4096, 1, 64, 4096, cfg)
    assert wide["rows"] == 32 and wide["chunks"] == 2


# --- exact skipping (key norms) ------------------------------------------------------------------------

LOG2E = 1 / math.log(2)


def block_norms(case: Case) -> torch.Tensor:
    """What the cache's writes keep: each block's largest key norm per head over its written keys
    (the case's NaN slots are unwritten; fully unused blocks get 0)."""
    norms = torch.linalg.vector_norm(case.k_pool.float(), dim=-1)  # [blocks, bs, H]
    return torch.nan_to_num(norms, nan=0.0).amax(dim=1).contiguous()  # [blocks, H]


def first_kept(case: Case, norms: torch.Tensor, r: int, first_block: int, stop_block: int) -> list[int]:
    """Per head, the first block index in [first_block, stop_block) of row r's table whose bound says
    it may hold a weight that is not exactly 0.0 (float64; the kernels' rule, paged.py)."""
    bs = case.k_pool.shape[1]
    n = int(case.seq_lens[r])
    q = case.q[r].double()  # [H, D]
    k_diag = case.k_pool[int(case.tables[r, (n - 1) // bs]), (n - 1) % bs].double()  # [H, D]
    qn = q.norm(dim=-1) * case.scale * LOG2E
    s_diag = (q * k_diag).sum(-1) * case.scale * LOG2E
    out = []
    for h in range(q.shape[0]):
        kept = stop_block
        for i in range(first_block, stop_block):
            near = min((i + 1) * bs - 1, n - 1)
            bound = qn[h] * norms[int(case.tables[r, i]), h] - float(case.slopes[h]) * LOG2E * (n - 1 - near) - s_diag[h]
            if bound >= paged_triton_bound():
                kept = i
                break
        out.append(kept)
    return out


def paged_triton_bound() -> float:
    from pipeline.engine.backends.paged_triton_kernels import SKIP_BOUND_LOG2

    return SKIP_BOUND_LOG2


def skipping_case(cascade: bool) -> Case:
    """Steep heads over 28-40 blocks of 16 keys (most of their keys provably weigh 0.0), a flat head
    (slope 0: nothing is skippable) and, in an early block of row 0, one huge key aligned with its
    query on head 1: far back, yet it dominates that row's output, so its block must be read."""
    groups = ((24, (0, 1)), (0, ())) if cascade else ((0, ()),)
    own = (40, 5 * 16 + 3, 16 * 30) if cascade else (16 * 28 + 5, 16 * 33, 7 * 16)
    case = make_case(16, h=4, seed=21, groups=groups, own=own, max_blocks=48)
    case.slopes = torch.tensor([1.5, 0.6, 0.25, 0.0])
    far = 2 if cascade else 1  # a block of row 0 ~400 keys back
    blk, h = int(case.tables[0, far]), 1
    case.k_pool[blk, 3, h] = case.q[0, h] / case.q[0, h].norm() * 1200.0
    return case


@pytest.mark.parametrize("cascade", [False, True])
def test_triton_skipping_reads_no_skippable_block_and_changes_nothing(interpreted_paged, cascade):
    """Every block the bound lets a query skip is poisoned with NaN after the norms are taken: the
    kernels with key norms must still give float64's result (they never read those blocks), while
    without norms they read them and turn NaN (the poison is real). The huge far key's block is kept."""
    pt = interpreted_paged
    case = skipping_case(cascade)
    norms = block_norms(case)
    ref = reference(case)
    bs = 16
    poisoned = 0
    plen = {r: int(case.cascade.prefix_lens[g]) for r, g in enumerate(case.cascade.row_group.tolist()) if g >= 0}
    for r, n in enumerate(case.seq_lens.tolist()):
        start_block = plen.get(r, 0) // bs if cascade else 0
        for h, kept in enumerate(first_kept(case, norms, r, start_block, -(-n // bs))):
            for i in range(start_block, kept):
                case.k_pool[int(case.tables[r, i]), :, h] = math.nan
                case.v_pool[int(case.tables[r, i]), :, h] = math.nan
                poisoned += 1
    if cascade:  # the shared prefix: blocks no row of the group needs
        rows = [r for r in plen]
        n_pref = plen[rows[0]] // bs
        for h in range(4):
            kept = min(first_kept(case, norms, r, 0, n_pref)[h] for r in rows)
            for i in range(kept):
                case.k_pool[int(case.tables[rows[0], i]), :, h] = math.nan
                poisoned += 1
    assert poisoned >= 20  # the steep heads skip most of their keys
    assert first_kept(case, norms, 0, 0, 10)[1] <= (2 if cascade else 1)  # the huge key's block is kept
    out = pt.decode(case.q, case.k_pool, case.v_pool, case.tables, case.seq_lens, case.slopes, scale=case.scale,
                    cascade=case.cascade if cascade else None, key_norms=norms, config=small_config(pt))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert (ref[0, 1] - case.v_pool[int(case.tables[0, 2 if cascade else 1]), 3, 1].double()).abs().max() < 1e-3
    unskipped = run_triton(pt, case, cascade)
    assert unskipped.isnan().any()


def test_update_key_norms_restarts_fresh_blocks_and_maxes_the_rest():
    norms = torch.full((4, 2), 9.0)  # stale values from the blocks' earlier owners
    k = torch.tensor([[[3.0, 4.0], [0.0, 1.0]], [[0.0, 2.0], [6.0, 8.0]], [[1.0, 0.0], [0.0, 0.0]]])  # [3, H, D]
    blocks = torch.tensor([1, 1, 2])
    paged.update_key_norms(norms, k, blocks, torch.tensor([1]))  # block 1 starts here, block 2 continues
    assert norms.tolist() == [[9.0, 9.0], [5.0, 10.0], [9.0, 9.0], [9.0, 9.0]]


def test_paged_layer_writes_keep_every_blocks_key_norms(tiny_model):
    """Through the cache's own writes (prefill chunks starting mid-block, decode rows), over blocks that
    held other keys before: each block's entry is the max norm of the keys it holds now."""
    from pipeline.engine.metadata import DecodeMeta, PrefillMeta
    from pipeline.engine.paged_cache import PagedKVCache, PoolSize, bytes_per_token

    model, _ = tiny_model
    cfg = model.config
    bs = 8
    cache = PagedKVCache(cfg, PoolSize(6, bs, bs * bytes_per_token(cfg, torch.float32)), device="cpu",
                         dtype=torch.float32)
    layer = cache.layer(0)
    g = torch.Generator().manual_seed(0)

    def keys(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(1, n, cfg.n_heads, cfg.head_dim, generator=g) * 3 for _ in range(2))

    ids = (4, 1, 5)
    stale = keys(3 * bs)  # an earlier owner of the same blocks, with larger keys
    layer.write_prefill(*(t * 10 for t in stale), PrefillMeta(start=0, num_tokens=3 * bs, block_ids=ids))
    layer.write_prefill(*keys(11), PrefillMeta(start=0, num_tokens=11, block_ids=ids))  # block 4, half of 1
    layer.write_prefill(*keys(6), PrefillMeta(start=11, num_tokens=6, block_ids=ids))  # rest of 1, into 5
    k1, v1 = keys(1)
    layer.write_decode(k1[:, 0], v1[:, 0], DecodeMeta(positions=torch.tensor([17]), seq_lens=torch.tensor([18]),
                                                      slot_mapping=torch.tensor([5 * bs + 1])))
    held = {4: bs, 1: bs, 5: 2}  # keys each block holds now
    for blk, count in held.items():
        want = torch.linalg.vector_norm(layer.k[blk, :count], dim=-1).amax(dim=0)  # [H]
        torch.testing.assert_close(cache.key_norms[0, blk], want)
