"""source: fetch, unpack (tar, source RPM), the patch runner, prepare a tree."""
