"""boot: disk images, test guests and the boot test."""
