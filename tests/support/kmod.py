"""Helpers for the kmod tests: real ELF objects with a .modinfo section, made by the host's gcc,
and the IS_ENABLED probe program used with and without the compat header."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMPAT_HEADER = REPO / "compat" / "kmod" / "kvmlab-compat.h"

# A translation unit checking IS_ENABLED & co. the way kernel code uses them: in #if and in C.
# CONFIG_Y is =y, CONFIG_M is =m, CONFIG_N is unset, CONFIG_TWO is defined but not to 1.
PROBE_C = r"""
#define CONFIG_Y 1
#define CONFIG_M_MODULE 1
#define CONFIG_TWO 2
#if !IS_ENABLED(CONFIG_Y) || !IS_ENABLED(CONFIG_M) || IS_ENABLED(CONFIG_N)
#error "IS_ENABLED wrong in #if"
#endif
#if !IS_BUILTIN(CONFIG_Y) || IS_BUILTIN(CONFIG_M) || IS_BUILTIN(CONFIG_N)
#error "IS_BUILTIN wrong in #if"
#endif
#if IS_MODULE(CONFIG_Y) || !IS_MODULE(CONFIG_M) || IS_MODULE(CONFIG_N)
#error "IS_MODULE wrong in #if"
#endif
#if IS_ENABLED(CONFIG_TWO)
#error "IS_ENABLED must be 0 for an option not defined to 1"
#endif
_Static_assert(IS_ENABLED(CONFIG_Y) == 1 && IS_ENABLED(CONFIG_M) == 1, "C: enabled");
_Static_assert(IS_ENABLED(CONFIG_N) == 0 && IS_BUILTIN(CONFIG_M) == 0, "C: disabled");
int probe_reachable_m(void) { return IS_REACHABLE(CONFIG_M); }
"""


def gcc() -> str | None:
    return shutil.which("gcc")


def cc(args: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["gcc", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def macro_table(args: list[str], cwd: Path) -> set[str]:
    """Every macro defined after preprocessing an empty file with args (gcc -E -dM)."""
    (cwd / "empty.c").write_text("")
    p = cc(["-E", "-dM", *args, "empty.c"], cwd)
    assert p.returncode == 0, p.stderr
    return set(p.stdout.splitlines())


def make_module_object(dest: Path, modinfo: list[str], cwd: Path) -> Path:
    """A real ELF relocatable object (gcc -c) whose .modinfo section holds the given key=value
    strings, laid out like the kernel's MODULE_INFO() (NUL-separated)."""
    lines = [f'__attribute__((section(".modinfo"), used, aligned(1))) '
             f'static const char mi{i}[] = "{kv}";' for i, kv in enumerate(modinfo)]
    src = cwd / (dest.stem.replace("-", "_") + "_src.c")
    src.write_text("\n".join(lines) + "\nint kvmlab_probe_fn(void) { return 0; }\n")
    p = cc(["-c", "-O0", "-o", str(dest), str(src)], cwd)
    assert p.returncode == 0, p.stderr
    return dest
