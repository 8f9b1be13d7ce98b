"""Where ember keeps its state: ``$EMBER_HOME``.

Default: ``/var/lib/ember`` for root, ``~/.local/share/ember`` otherwise.
Every command and every component asks this module, never builds paths itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ember.homedir import default_home_dir


def default_home() -> Path:
    return Path(default_home_dir())


@dataclass(frozen=True)
class Home:
    """The layout of one state directory."""

    root: Path

    @classmethod
    def from_env(cls) -> Home:
        return cls(default_home())

    @property
    def content(self) -> Path:
        return self.root / "content"

    @property
    def db_path(self) -> Path:
        """The host's SQLite file (image table, and the registry's tables by default)."""
        return self.root / "ember.db"

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.db_path}"

    @property
    def credentials(self) -> Path:
        return self.root / "credentials.json"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def kernels(self) -> Path:
        return self.root / "kernels"

    @property
    def machines(self) -> Path:
        return self.root / "machines"

    @property
    def run(self) -> Path:
        """Runtime state (locks, sockets, pids)."""
        return self.root / "run"

    @property
    def config_file(self) -> Path:
        return self.root / "config.json"

    @property
    def config_lock(self) -> Path:
        """Held while ``config.json`` is read and rewritten (the registry's first start
        writes its secret there)."""
        return self.root / ".config.lock"

    # -- paths one area each uses (named here all the same: Home alone knows the layout) --

    @property
    def images_lock(self) -> Path:
        """Pulls hold it shared, ``ember gc`` exclusively (``ember.images.locking``)."""
        return self.run / "images.lock"

    @property
    def claims(self) -> Path:
        """One file per running command that relies on blobs (``ember.images.locking``)."""
        return self.run / "claims"

    @property
    def claims_lock(self) -> Path:
        return self.run / "claims.lock"

    @property
    def net_state(self) -> Path:
        """The addresses and ports running machines hold (``ember.net.manager``)."""
        return self.root / "net" / "state.json"

    @property
    def net_lock(self) -> Path:
        return self.run / "net.lock"

    @property
    def agent_lock(self) -> Path:
        """Held by the one ``ember agent`` serving this home."""
        return self.run / "agent.lock"

    @property
    def monitor_log(self) -> Path:
        """Where a machine monitor logs until it knows its machine."""
        return self.run / "monitor.log"

    @property
    def registry(self) -> Path:
        """The registry server's own content store and uploads (``ember.registry.server``)."""
        return self.root / "registry"

    @property
    def accel_cache(self) -> Path:
        """Which accelerator boots a guest here, per host boot and kernel
        (``ember.vm.vmm.accel``)."""
        return self.root / "accel.json"

    @property
    def default_kernel(self) -> Path:
        """A symlink to the directory (under ``kernels``) of the kernel machines boot."""
        return self.kernels / "default"

    @property
    def kernel_install_lock(self) -> Path:
        return self.kernels / ".install.lock"

    @property
    def custom_kernels(self) -> Path:
        """Kernels extracted from a configured compressed kernel, one directory per digest."""
        return self.kernels / "custom"

    @property
    def initramfs_cache(self) -> Path:
        """Base initramfs archives, one per kernel and ember-init (``ember.vm.initramfs``)."""
        return self.kernels / "initramfs"

    @property
    def templates(self) -> Path:
        """Machine templates (``ember.vm.template``)."""
        return self.kernels / "templates"

    @property
    def machine_names_lock(self) -> Path:
        """Held while a new machine's name is checked and taken (``ember.machines.store``)."""
        return self.machines / ".names.lock"

    def ensure(self) -> Home:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self
