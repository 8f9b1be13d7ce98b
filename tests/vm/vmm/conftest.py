from __future__ import annotations

import pytest

from ember.vm.kernel import KernelInfo
from tests.vm.vmm.kernelcache import cached_kernel


@pytest.fixture(scope="session")
def kernel() -> KernelInfo:
    return cached_kernel()
