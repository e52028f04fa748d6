"""`python3 -m kvmlab TASK ...` — the same program as the `kvmlab` console command."""
from kvmlab.cli import main

main()
