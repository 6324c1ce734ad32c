//! Turns the nginx-sys metadata (version, configured features, OS) into cfgs,
//! so that code can follow the nginx it is built against.

fn main() {
    println!("cargo::rerun-if-env-changed=DEP_NGINX_FEATURES_CHECK");
    println!(
        "cargo::rustc-check-cfg=cfg(ngx_feature, values({}))",
        std::env::var("DEP_NGINX_FEATURES_CHECK").unwrap_or_else(|_| "any()".to_string())
    );
    println!("cargo::rerun-if-env-changed=DEP_NGINX_FEATURES");
    if let Ok(features) = std::env::var("DEP_NGINX_FEATURES") {
        for feature in features.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            println!("cargo::rustc-cfg=ngx_feature=\"{feature}\"");
        }
    }

    println!("cargo::rerun-if-env-changed=DEP_NGINX_OS_CHECK");
    println!(
        "cargo::rustc-check-cfg=cfg(ngx_os, values({}))",
        std::env::var("DEP_NGINX_OS_CHECK").unwrap_or_else(|_| "any()".to_string())
    );
    println!("cargo::rerun-if-env-changed=DEP_NGINX_OS");
    if let Ok(os) = std::env::var("DEP_NGINX_OS") {
        println!("cargo::rustc-cfg=ngx_os=\"{os}\"");
    }

    // Every callback the module uses (notify and the SSL session pair
    // included) exists in every nginx it is built for, so no code depends
    // on the version; the stock-cache switch of nginx 1.29.7 is harmless on
    // older versions and always built. Older than the oldest nginx the
    // suites run against is worth a word, not a refusal.
    const OLDEST_TESTED: (u64, &str) = (1_022_001, "1.22.1");
    println!("cargo::rerun-if-env-changed=DEP_NGINX_VERSION_NUMBER");
    if let Ok(Ok(version)) = std::env::var("DEP_NGINX_VERSION_NUMBER").map(|v| v.parse::<u64>()) {
        if version < OLDEST_TESTED.0 {
            println!(
                "cargo::warning=nginx {version} is older than {}, the oldest nginx this module is tested with",
                OLDEST_TESTED.1
            );
        }
    }

    println!("cargo::rerun-if-env-changed=DEP_NGINX_BUILD_DIR");
    if let Ok(build_dir) = std::env::var("DEP_NGINX_BUILD_DIR") {
        println!("cargo::rustc-env=DEP_NGINX_BUILD_DIR={build_dir}");
    }
}
