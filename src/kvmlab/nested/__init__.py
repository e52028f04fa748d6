"""nested: a lab VM under TCG with emulated SVM in which kvmlab loads KVM and boots a guest."""
