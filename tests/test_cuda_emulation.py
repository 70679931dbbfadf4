"""The CUDA emulation harness (csrc/cuda_emu) checks what it claims to: each self-test kernel of
csrc/cuda_emu/selftest.cu breaks one rule, and the launch must fail with that rule's report (out
of bounds: AddressSanitizer's, which ends the process, so those run in a child process). Runs in
the CUDA emulation build only (scripts/cuda_emu.sh)."""

import os
import subprocess
import sys

import pytest

import attnkern

pytestmark = pytest.mark.skipif(not attnkern.backends()["cuda"].emulated,
                                reason="not the CUDA emulation build (scripts/cuda_emu.sh)")


def _selftest(name):
    import attnkern._cuda_emu as emu

    return emu.selftest(name)


def test_backend_says_it_is_emulated():
    info = attnkern.backends()["cuda"]
    assert info.available and info.emulated and info.reason == ""


def _expected_shuffles():
    """What a GPU gives lane i for each case of the self-test (the source lane, as a float)."""
    def rows():
        for i in range(32):
            seg8, seg16 = i // 8 * 8, i // 16 * 16
            yield [
                i ^ 1,                                              # xor 1
                (i ^ 8) if (i ^ 8) <= seg8 + 7 else i,              # xor 8, width 8: PTX bfly rule
                i + 1 if i < 31 else i,                             # down 1
                i + 3 if i + 3 <= seg8 + 7 else i,                  # down 3, width 8
                i - 2 if i - 2 >= seg16 else i,                     # up 2, width 16
                seg8 + 3,                                           # idx 3, width 8
                3,                                                  # idx 35 (mod 32)
            ]
    by_lane = list(rows())
    return [float(by_lane[i][case]) for case in range(7) for i in range(32)]


def test_shuffle_modes_and_widths():
    assert _selftest("shuffle_modes") == _expected_shuffles()


def test_barriers_and_static_shared_memory():
    out = _selftest("block_sum")
    assert out[:2] == [128 * 129 / 2] * 2  # one sum per block, each block its own shared buffer


@pytest.mark.parametrize("name,report", [
    ("shared_race", r"writes byte \d+ of __shared__ buf that thread \d+ read .* since the last "
                    r"__syncthreads \(a shared-memory race\)"),
    ("uninitialised_shared", r"reads byte 0 of __shared__ buf, which nothing has written"),
    ("divergent_barrier", r"divergent __syncthreads: thread 0 .*selftest.cu:\d+ while thread 64"),
    ("barrier_after_exit", r"__syncthreads .*selftest.cu:\d+: thread 0 .* waits there but "
                           r"thread 64 .* has exited"),
    ("shuffle_lane_missing", r"deadlock: .*__shfl_xor_sync .* but thread 31 .*, in its mask, "
                             r"has exited"),
    ("shuffle_source_outside_mask", r"thread 0 .* reads lane 16, which is not in the mask 0xffff"),
    ("divergent_shuffle", r"divergent shuffle: thread 0 .*selftest.cu:\d+ .* while thread 16"),
])
def test_broken_kernel_is_reported(name, report):
    with pytest.raises(RuntimeError, match=report):
        _selftest(name)
    # The failure is reported once: the next launch runs normally.
    assert _selftest("block_sum")[:2] == [128 * 129 / 2] * 2


@pytest.mark.parametrize("name", ["global_out_of_bounds", "shared_out_of_bounds"])
def test_out_of_bounds_access_is_caught_by_asan(name):
    code = "import attnkern._cuda_emu as emu; emu.selftest(%r)" % name
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ), timeout=300)
    assert res.returncode != 0
    assert "AddressSanitizer: heap-buffer-overflow" in res.stderr
    assert "selftest.cu" in res.stderr  # the report names the kernel's line

