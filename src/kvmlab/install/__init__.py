"""install: transactional install of artifacts and firmware where qemu looks."""
