"""The x86 platform's firmware side: ACPI and MP tables, address-space and IRQ allocation."""
