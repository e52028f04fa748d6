"""host: CPU and KVM facts, the doctor verdict, kvm modules, exit reasons."""
