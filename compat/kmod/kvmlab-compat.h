/*
 * kvmlab-compat.h: IS_ENABLED / IS_BUILTIN / IS_MODULE / IS_REACHABLE for kernel headers that lack
 * them.
 *
 * For:   target kernels older than Linux 3.1 (e.g. CentOS/RHEL 6's 2.6.32), whose headers have no
 *        include/linux/kconfig.h macros, when building kvm code written for newer kernels (which
 *        uses IS_ENABLED(CONFIG_...) all over arch/x86/kvm and virt/kvm).
 *        Any C99 preprocessor (variadic macros and ## pasting: gcc >= 3, so RHEL 6's gcc 4.4 too;
 *        kvmlab's tests run it through gcc 12, on the host and in the debian12-kmod builder).
 * How:   kvmlab.kmodbuild force-includes this file (KCFLAGS += -include kvmlab-compat.h) only when
 *        no header under the target's include/linux defines IS_ENABLED. Each macro is guarded by
 *        #ifndef, and the helpers use names of their own and are defined only when one of the
 *        four is missing, so on kernels that do have them (their include/linux/kconfig.h is
 *        force-included before this file) it defines nothing at all: the preprocessor's macro
 *        table with and without it is compared by tests/unit/test_kmodbuild.py (host gcc) and
 *        tests/integration/test_kmodbuild_docker.py (builder gcc, the real 6.1 kconfig.h).
 * Works with 2.6.x autoconf.h, which defines CONFIG_FOO as 1 for =y and CONFIG_FOO_MODULE as 1
 * for =m, exactly like later kernels: the placeholder trick below turns "defined to 1" into 1 and
 * anything else (undefined, or defined to another value) into 0, usable in #if and in C.
 * Upstream: N/A: written for kvmlab (the same semantics as Linux >= 3.1 include/linux/kconfig.h).
 */
/* No include guard on purpose: every definition is #ifndef-guarded (so including it twice is
 * harmless) and a guard macro would be the one definition left behind on new kernels. */
#if !defined(IS_BUILTIN) || !defined(IS_MODULE) || !defined(IS_ENABLED) || !defined(IS_REACHABLE)
#ifndef __kvmlab_is_one
#define __kvmlab_placeholder_1 0,
#define __kvmlab_take_second(ignored, val, ...) val
#define __kvmlab_is_one3(arg_or_junk) __kvmlab_take_second(arg_or_junk 1, 0, 0)
#define __kvmlab_is_one2(val) __kvmlab_is_one3(__kvmlab_placeholder_##val)
#define __kvmlab_is_one(x) __kvmlab_is_one2(x)
#endif
#endif

#ifndef IS_BUILTIN
/* 1 when CONFIG_FOO is y (defined to 1), else 0. */
#define IS_BUILTIN(option) __kvmlab_is_one(option)
#endif

#ifndef IS_MODULE
/* 1 when CONFIG_FOO is m (CONFIG_FOO_MODULE defined to 1), else 0. */
#define IS_MODULE(option) __kvmlab_is_one(option##_MODULE)
#endif

#ifndef IS_ENABLED
/* 1 when CONFIG_FOO is y or m, else 0. */
#define IS_ENABLED(option) (IS_BUILTIN(option) || IS_MODULE(option))
#endif

#ifndef IS_REACHABLE
/* 1 when CONFIG_FOO is y, or m and the code using it is itself built as a module (Linux 4.1). */
#define IS_REACHABLE(option) (IS_BUILTIN(option) || (IS_MODULE(option) && __kvmlab_is_one(MODULE)))
#endif
