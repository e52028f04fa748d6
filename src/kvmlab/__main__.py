"""`python3 -m kvmlab TASK ...` — the same program as the `kvmlab` console command."""
from .cli import main

main()
