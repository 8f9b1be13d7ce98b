"""The monitor's choice when a restored template does not acknowledge its run config."""

import pytest

from ember.machines.restore import AfterRestore, after_unacknowledged_restore
from ember.vm.vmm.base import VMExit

CLEAN, FAILED, KILLED = VMExit(0, None), VMExit(1, None), VMExit(None, 9)


@pytest.mark.parametrize("sent", [False, True])
@pytest.mark.parametrize("spoke", [False, True])
def test_a_vmm_killed_while_restoring_is_not_booted_again(sent: bool, spoke: bool) -> None:
    assert after_unacknowledged_restore(sent, KILLED, spoke, True) is AfterRestore.KILLED


@pytest.mark.parametrize("sent", [False, True])
def test_a_vmm_that_crashed_on_the_state_means_boot(sent: bool) -> None:
    """Review finding: any signal death counted as the user's kill, the template was
    kept, and every machine of its shape failed the same way."""
    aborted = VMExit(None, 6)
    assert after_unacknowledged_restore(sent, aborted, False, False) is AfterRestore.BOOT
    # a guest whose program had spoken ran it: never a second run
    assert after_unacknowledged_restore(True, aborted, True, False) is AfterRestore.KEEP
    # SIGKILL that the user did not send: the host's OOM killer, no fault of the template
    assert after_unacknowledged_restore(sent, KILLED, False, False) is AfterRestore.KILLED


@pytest.mark.parametrize("ended", [None, CLEAN, FAILED])
def test_a_config_that_never_went_out_means_boot(ended: VMExit | None) -> None:
    assert after_unacknowledged_restore(False, ended, False) is AfterRestore.BOOT


@pytest.mark.parametrize("ended", [None, CLEAN, FAILED])
def test_a_guest_whose_program_spoke_after_its_config_is_kept(ended: VMExit | None) -> None:
    # the lost "ok" of a guest that runs: booting it again would run the program twice
    assert after_unacknowledged_restore(True, ended, True) is AfterRestore.KEEP


def test_a_vmm_that_failed_to_load_the_state_means_boot() -> None:
    assert after_unacknowledged_restore(True, FAILED, False) is AfterRestore.BOOT


def test_a_silent_guest_that_powered_off_cleanly_is_kept() -> None:
    assert after_unacknowledged_restore(True, CLEAN, False) is AfterRestore.KEEP


def test_a_silent_running_guest_without_an_answer_means_boot() -> None:
    assert after_unacknowledged_restore(True, None, False) is AfterRestore.BOOT
