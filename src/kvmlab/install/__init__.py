"""The install room's public face: install, install-bios and uninstall, and what other rooms read
(the installed qemu, the install manifests).

Modules: txn (the transaction and the install manifest), preflight (checks before writing),
binaries (install), deps (runtime libraries), firmware (install-bios), probe (qemu questions,
an adapter until kvmlab.qemu replaces it), uninstall.
"""
from kvmlab.install.binaries import MODES, InstallResult, binary_path, install, load_build
from kvmlab.install.deps import parse_ldconfig
from kvmlab.install.firmware import (
    BIOS_RE,
    BiosResult,
    SearchInfo,
    explain_failure,
    find_search_dirs,
    install_bios,
)
from kvmlab.install.probe import ProbeRun, qemu_version, run_probe
from kvmlab.install.txn import (
    BACKUP_SUFFIX,
    QEMU_NAME,
    FileRow,
    installed_qemu,
    list_manifests,
    manifest_path,
)
from kvmlab.install.uninstall import UninstallResult, uninstall
from kvmlab.qemu.binary import l_help as qemu_l_help

__all__ = [
    "BACKUP_SUFFIX", "BIOS_RE", "MODES", "QEMU_NAME", "BiosResult", "FileRow", "InstallResult",
    "ProbeRun", "SearchInfo", "UninstallResult", "binary_path", "explain_failure",
    "find_search_dirs", "install", "install_bios", "installed_qemu", "list_manifests",
    "load_build", "manifest_path", "parse_ldconfig", "qemu_l_help", "qemu_version", "run_probe",
    "uninstall",
]
