import torch

from kvtier.connectors.staging import StagingBuffers


def test_a_released_buffer_is_reused_for_a_load_that_fits():
    staging = StagingBuffers((2, 3), torch.float32)
    first = staging.acquire(3)
    assert first.shape == (4, 2, 3)  # rounded up to a power of two
    staging.release(first)
    again = staging.acquire(3)
    assert again.data_ptr() == first.data_ptr()
    bigger = staging.acquire(5)  # nothing free fits: a new one
    assert bigger.shape[0] == 8 and bigger.data_ptr() != first.data_ptr()
    small, large = staging.acquire(2), staging.acquire(6)
    staging.release(large)
    staging.release(small)  # several free buffers of different sizes: the smallest fitting one
    assert staging.acquire(2).data_ptr() == small.data_ptr()
    assert staging.acquire(5).data_ptr() == large.data_ptr()


def test_free_buffers_are_bounded_by_bytes_largest_kept():
    block_bytes = 2 * 3 * 4
    staging = StagingBuffers((2, 3), torch.float32, keep_bytes=10 * block_bytes)
    buffers = [staging.acquire(n) for n in (2, 8, 4)]
    assert [b.shape[0] for b in buffers] == [2, 8, 4]
    for b in buffers:
        staging.release(b)
    kept = sorted(b.shape[0] for b in staging._free)
    assert kept == [8]  # 8 + 4 blocks would exceed 10; the largest stays
    assert staging.acquire(8).data_ptr() == buffers[1].data_ptr()
