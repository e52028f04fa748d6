"""build: builder images, the container runner, qemu and kmod builds, artifacts."""
