"""The KVM objects with their x86 set-up: `Kvm`, `Vm`, `Vcpu`, guest memory, the dirty log, vCPU
exits and state, CPUID."""
