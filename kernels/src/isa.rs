//! The instruction set the CPU kernels run, chosen once per process from the CPU's features,
//! or forced with `LOCKSTEP_CPU_KERNEL=scalar|avx2|avx512|avx512bf16|amx` (if the CPU has it),
//! so a test or a benchmark can run every path one machine has. The last two are AVX-512 for
//! the vector kernels plus a bf16 matrix unit for bf16 GEMMs ([`Bf16Unit`]); forcing a path
//! without one makes bf16 jobs compute in fp32.
//!
//! The hand-written kernels (`skinny`) have one body per ISA. The element-wise kernels have
//! one body, compiled once per ISA by [`multiversion!`]: plain Rust never fuses a multiply
//! and an add, and their reductions run in explicit lanes, so every ISA gives the same bits.
//! `scalar` is the baseline x86-64 build (SSE2), and `matmul` leaves few-row products to
//! `gemm`, which picks its own kernels at run time.

/// The instruction sets, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 F/DQ/BW/VL (with AVX2 and FMA).
    Avx512,
    /// AVX2 and FMA.
    Avx2,
    /// The baseline build.
    Scalar,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Scalar => "scalar",
        }
    }
}

/// The hardware a bf16 GEMM runs on (see `bf16_gemm`), best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Unit {
    /// AMX tiles: `tdpbf16ps`, a 16×16 fp32 tile += 16×32 · 32×16 bf16 per instruction.
    Amx,
    /// AVX512-BF16: `vdpbf16ps`, 16 fp32 lanes += 16 bf16 pairs · 16 bf16 pairs.
    Avx512Bf16,
}

impl Bf16Unit {
    pub fn name(self) -> &'static str {
        match self {
            Bf16Unit::Amx => "amx",
            Bf16Unit::Avx512Bf16 => "avx512bf16",
        }
    }
}

/// The ISA this process uses: `LOCKSTEP_CPU_KERNEL`'s if the CPU has it, else the best.
pub fn current() -> Isa {
    chosen().0
}

/// The bf16 matrix unit this process uses, if any: `LOCKSTEP_CPU_KERNEL`'s, else the best.
pub fn bf16_unit() -> Option<Bf16Unit> {
    chosen().1
}

fn chosen() -> (Isa, Option<Bf16Unit>) {
    static CHOSEN: std::sync::OnceLock<(Isa, Option<Bf16Unit>)> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let best = (supported()[0], bf16_units().first().copied());
        let asked = match std::env::var("LOCKSTEP_CPU_KERNEL").as_deref() {
            Ok("amx") => (Isa::Avx512, Some(Bf16Unit::Amx)),
            Ok("avx512bf16") => (Isa::Avx512, Some(Bf16Unit::Avx512Bf16)),
            Ok("avx512") => (Isa::Avx512, None),
            Ok("avx2") => (Isa::Avx2, None),
            // "gemm": this variable's name for the baseline before it covered more than matmul.
            Ok("scalar") | Ok("gemm") => (Isa::Scalar, None),
            _ => return best,
        };
        let unit_ok = asked.1.is_none_or(|u| bf16_units().contains(&u));
        if supported().contains(&asked.0) && unit_ok {
            asked
        } else {
            best
        }
    })
}

/// The bf16 units this CPU (and its OS) can run, best first; often none.
pub fn bf16_units() -> &'static [Bf16Unit] {
    static HAVE: std::sync::OnceLock<Vec<Bf16Unit>> = std::sync::OnceLock::new();
    HAVE.get_or_init(detect_bf16)
}

fn detect_bf16() -> Vec<Bf16Unit> {
    let mut have = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        // Both units read operands packed by AVX-512 code.
        if supported().contains(&Isa::Avx512) && std::is_x86_feature_detected!("avx512bf16") {
            if amx_bf16_usable() {
                have.push(Bf16Unit::Amx);
            }
            have.push(Bf16Unit::Avx512Bf16);
        }
    }
    have
}

/// AMX-BF16 in CPUID (leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE) and the kernel's
/// permission for this process to use the tile data state (Linux ≥ 5.16: without it the
/// first tile instruction faults).
#[cfg(target_arch = "x86_64")]
fn amx_bf16_usable() -> bool {
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    let cpu_has = (leaf7.edx >> 22) & 1 == 1 && (leaf7.edx >> 24) & 1 == 1;
    cpu_has && request_tile_permission()
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes this process's permitted xsave
    // features; it fails harmlessly on kernels or CPUs without AMX.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tile_permission() -> bool {
    false
}

/// The ISAs this CPU can run, best first; `Scalar` is always there.
pub fn supported() -> &'static [Isa] {
    static HAVE: std::sync::OnceLock<Vec<Isa>> = std::sync::OnceLock::new();
    HAVE.get_or_init(detect)
}

fn detect() -> Vec<Isa> {
    let mut have = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        let avx512 = ["avx512f", "avx512dq", "avx512bw", "avx512vl"].iter().all(|f| detected(f));
        if avx2 && avx512 {
            have.push(Isa::Avx512);
        }
        if avx2 {
            have.push(Isa::Avx2);
        }
    }
    have.push(Isa::Scalar);
    have
}

#[cfg(target_arch = "x86_64")]
fn detected(feature: &str) -> bool {
    match feature {
        "avx512f" => std::is_x86_feature_detected!("avx512f"),
        "avx512dq" => std::is_x86_feature_detected!("avx512dq"),
        "avx512bw" => std::is_x86_feature_detected!("avx512bw"),
        "avx512vl" => std::is_x86_feature_detected!("avx512vl"),
        _ => false,
    }
}

/// Defines `pub fn $name(args)`, which runs `body` compiled for [`current()`], and
/// `pub fn $on(isa, args)`, which runs it compiled for `isa` (one of [`supported()`]: how the
/// tests run every path). The body must not call functions that are not `#[inline(always)]`
/// in its hot loop: those keep the baseline ISA.
#[macro_export]
macro_rules! multiversion {
    ($(#[$meta:meta])* pub fn $name:ident / $on:ident ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            $on($crate::isa::current(), $($arg),*)
        }

        /// As the function above, compiled for `isa`, which must be one of
        /// [`supported()`](crate::isa::supported).
        #[allow(clippy::too_many_arguments)]
        pub fn $on(isa: $crate::isa::Isa, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            fn avx2($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            fn avx512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            assert!($crate::isa::supported().contains(&isa), "{isa:?} is not on this CPU");
            match isa {
                // SAFETY: the CPU has the ISA's features (asserted above).
                #[cfg(target_arch = "x86_64")]
                $crate::isa::Isa::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::isa::Isa::Avx2 => unsafe { avx2($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}

/// Test helper: every ISA the CPU has gives the baseline's exact bits (`run(isa)` returns
/// the kernel's outputs); prints the paths it cannot run.
#[cfg(test)]
pub(crate) fn same_bits(what: &str, run: impl Fn(Isa) -> Vec<f32>) {
    let want = run(Isa::Scalar);
    for &isa in supported() {
        let got = run(isa);
        let same = got.len() == want.len() && got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{what}: {isa:?} differs from scalar");
    }
    for isa in [Isa::Avx512, Isa::Avx2].iter().filter(|i| !supported().contains(i)) {
        println!("{what}: skipped the {} path, this CPU lacks it", isa.name());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalar_is_always_supported_and_the_choice_is_supported() {
        let have = supported();
        assert_eq!(have.last(), Some(&Isa::Scalar));
        assert!(have.contains(&current()));
        if let Some(unit) = bf16_unit() {
            assert!(bf16_units().contains(&unit));
            assert_eq!(current(), Isa::Avx512, "the bf16 units pack with AVX-512");
        }
        for unit in [Bf16Unit::Amx, Bf16Unit::Avx512Bf16].iter().filter(|u| !bf16_units().contains(u)) {
            println!("skipping the {} path: this CPU lacks it", unit.name());
        }
        for isa in [Isa::Avx512, Isa::Avx2].iter().filter(|i| !have.contains(i)) {
            println!("skipping the {} path: this CPU lacks it", isa.name());
        }
    }
}
