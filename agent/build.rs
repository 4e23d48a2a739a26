//! Link-time layout only: on Linux the binaries are linked with `link/cold-text.ld`, which moves
//! the code of the WASM engine and the sink after the rest (see the script for why).

fn main() {
    println!("cargo:rerun-if-changed=link/cold-text.ld");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    if linux {
        let script = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap())
            .join("link/cold-text.ld");
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
    }
}
