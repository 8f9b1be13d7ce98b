"""Errors of the VM assembly area: run configs, kernels, initramfs, templates."""

from __future__ import annotations

from ember.errors import EmberError, NotFound, UsageError


class VMError(EmberError):
    """Something about assembling a micro-VM went wrong."""


class InvalidRunConfig(UsageError, VMError):
    """A run config value cannot be given to the guest (bad user input or image config)."""


class NoCommand(InvalidRunConfig):
    """Neither the image nor the user gave a command to run."""


class KernelError(VMError):
    """The guest kernel could not be installed or used."""


class KernelNotFound(NotFound, KernelError):
    """No kernel is installed (or the given one does not exist)."""


class ModuleNotFoundInKernel(KernelError):
    """A kernel module the guest needs is not in the kernel's modules directory."""


class InitNotBuilt(VMError):
    """ember-init has not been built (``make init``)."""


class TemplateError(VMError):
    """A template VM could not be built, or a restore from one failed."""


class ConfigUnanswered(TemplateError):
    """The run config went out but the restored guest did not say ``ok``: it may have
    taken the config and started the program all the same."""
