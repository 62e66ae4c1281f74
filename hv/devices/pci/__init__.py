"""PCI: the host bridge (bus 0, configuration mechanism #1 and ECAM), functions' configuration
spaces with BARs and capabilities, MSI-X through KVM GSI routing and irqfd, and virtio-pci.

    PciRoot(windows, mmio_window, io_window)  bus 0, ports 0xCF8-0xCFF, `ecam` for the window
    PciConfigSpace(identity, bars)            a type 0 header's registers and their rules
    MsixVectors(config, n, bar, table, pba)   the capability, the table and the pending bits
    VirtioPciBlk / VirtioPciConsole / VirtioPciRng / VirtioPciNet   virtio 1.x modern devices on PCI

A machine gets its bus and functions through `hv.vmm.pci.register_pci_device`.
"""

from .config import Bar, BarKind, PciConfigSpace, PciIdentity
from .msix import MsixState, MsixVectors
from .root import PciAddress, PciFunction, PciRoot, PciRootState
from .virtio_pci import VirtioPci, VirtioPciBlk, VirtioPciConsole, VirtioPciNet, VirtioPciRng, VirtioPciState

__all__ = [
    "Bar", "BarKind", "MsixState", "MsixVectors", "PciAddress", "PciConfigSpace", "PciFunction", "PciIdentity",
    "PciRoot", "PciRootState", "VirtioPci", "VirtioPciBlk", "VirtioPciConsole", "VirtioPciNet", "VirtioPciRng", "VirtioPciState",
]
