"""targets: lookup, GPU architectures, and tile tables every kernel kind can rely on."""

import pytest

from kiln.codegen.kernels import gemm
from kiln.codegen.targets import TARGETS, get_target
from kiln.errors import KilnError

GPU_TARGETS = [name for name, target in TARGETS.items() if target.is_gpu]


def test_unknown_target_is_a_user_error_that_lists_the_known_ones():
    with pytest.raises(KilnError) as error:
        get_target("h800")
    message = str(error.value)
    assert "'h800'" in message
    for name in TARGETS:
        assert name in message


def test_lookup_ignores_case_and_spaces():
    assert get_target(" H100 ") is TARGETS["h100"]


@pytest.mark.parametrize("name", GPU_TARGETS)
def test_gpu_targets_cross_compile_for_their_arch(name):
    target = get_target(name)
    gpu_target = target.gpu_target()
    assert (gpu_target.backend, gpu_target.arch, gpu_target.warp_size) == (target.backend, target.arch, target.warp_size)
    if target.backend == "cuda":
        assert target.warp_size == 32 and target.arch_name == f"sm_{target.arch}{'a' if target.arch >= 90 else ''}"
    else:
        assert target.warp_size == 64 and target.arch_name == target.arch and target.arch.startswith("gfx")
    assert target.shared_mem_per_block <= target.shared_mem_per_sm


def test_cpu_target_has_no_gpu_architecture():
    with pytest.raises(KilnError, match="choose a GPU target"):
        get_target("cpu").gpu_target()


def test_every_target_has_tiles_for_every_kind_and_bucket():
    reference = {kind: set(buckets) for kind, buckets in TARGETS["cpu"].tile_table.items()}
    for target in TARGETS.values():
        assert {kind: set(buckets) for kind, buckets in target.tile_table.items()} == reference, target.name


@pytest.mark.parametrize("name", TARGETS)
def test_every_kernel_kind_chooses_power_of_two_tiles_on_every_target(name):
    target = get_target(name)
    variants = [gemm.choose(target, dtype="bf16", m=m, n=576, k=576) for m in (1, 64, 4096)]
    for variant in variants:
        blocks = [value for field, value in vars(variant).items() if field.startswith("block_")]
        assert blocks and all(block & (block - 1) == 0 for block in blocks), variant
        assert variant.num_warps & (variant.num_warps - 1) == 0, variant
    for kind, buckets in target.tile_table.items():
        for tiles in buckets.values():
            assert all(b & (b - 1) == 0 for b in tiles.blocks.values()), (kind, tiles)
            assert tiles.num_warps & (tiles.num_warps - 1) == 0, (kind, tiles)


def test_unknown_kind_or_bucket_names_what_exists():
    h100 = get_target("h100")
    with pytest.raises(LookupError, match="rows_tiled"):
        h100.tiles("softmax", "default")
    with pytest.raises(LookupError, match="decode"):
        h100.tiles("gemm", "huge")
