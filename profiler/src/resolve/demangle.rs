//! Demangling of Rust (legacy and v0) and C++ names. Anything else, C names in particular, is
//! returned exactly as it is: blazesym's own demangler would turn a C function `a` into
//! `signed char`, so it is switched off and only mangled-looking names come here.

use std::borrow::Cow;

/// The readable form of `name`, or `name` itself when it is not a Rust or C++ mangled name.
pub fn demangle(name: &str) -> Cow<'_, str> {
    if !(name.starts_with("_R") || name.starts_with("_Z") || name.starts_with("__Z")) {
        return Cow::Borrowed(name);
    }
    if let Ok(rust) = rustc_demangle::try_demangle(name) {
        // `{:#}` drops the legacy hash suffix (`::h0123abcd…`).
        return Cow::Owned(format!("{rust:#}"));
    }
    if let Ok(cpp) = cpp_demangle::Symbol::new(name) {
        if let Ok(text) = cpp.demangle() {
            return Cow::Owned(text);
        }
    }
    Cow::Borrowed(name)
}

#[cfg(test)]
mod tests {
    use super::demangle;

    #[test]
    fn c_names_stay_as_they_are() {
        for name in ["a", "main", "c", "h", "_start", "Z", "R"] {
            assert_eq!(demangle(name), name);
        }
    }

    #[test]
    fn rust_legacy_and_v0() {
        assert_eq!(
            demangle("_ZN4core3fmt5write17h0123456789abcdefE"),
            "core::fmt::write"
        );
        assert_eq!(demangle("_RNvCs1234_7mycrate3foo"), "mycrate::foo");
    }

    #[test]
    fn cpp() {
        assert_eq!(demangle("_Z3fooi"), "foo(int)");
        assert_eq!(demangle("_ZN2ns5Klass6methodEv"), "ns::Klass::method()");
    }

    #[test]
    fn junk_that_looks_mangled_is_kept() {
        assert_eq!(demangle("_Zzzz not mangled"), "_Zzzz not mangled");
    }
}
