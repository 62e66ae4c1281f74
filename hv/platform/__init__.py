"""The x86 platform: address-space and IRQ allocation, host CPU facts."""
