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

    // Parts of nginx's API that appeared after the oldest nginx the module
    // builds for, each a cfg `ngx_api = "..."` set when the nginx built
    // against has it. Every callback the module uses (notify and the SSL
    // session pair included) exists in every such nginx; the stock-cache
    // switch of nginx 1.29.7 is harmless on older versions and always built.
    const API_SINCE: &[(u64, &str)] = &[
        // ngx_http_upstream_conf_t's ssl_certificate and ssl_certificate_key:
        // proxy_ssl_certificate with variables (nginx 1.21.0); before,
        // the certificate was part of the SSL context.
        (1_021_000, "upstream_ssl_certificate"),
    ];
    let names: Vec<String> = API_SINCE
        .iter()
        .map(|(_, name)| format!("\"{name}\""))
        .collect();
    println!(
        "cargo::rustc-check-cfg=cfg(ngx_api, values({}))",
        names.join(", ")
    );
    println!("cargo::rerun-if-env-changed=DEP_NGINX_VERSION_NUMBER");
    // nginx-sys always reports the version; without it, assume a current nginx.
    let version = std::env::var("DEP_NGINX_VERSION_NUMBER")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    for (since, name) in API_SINCE {
        if version >= *since {
            println!("cargo::rustc-cfg=ngx_api=\"{name}\"");
        }
    }

    // The oldest nginx the module supports, as mk/versions.mk and the
    // "config" file say: before 1.19.10 nginx has no keepalive_time, nor
    // the connection start time it is measured from. nginx-sys has already
    // run bindgen by now, so the Makefile's check is the one that stops
    // such a build early; this one keeps cargo alone from compiling the
    // module against a tree it cannot serve.
    const OLDEST_SUPPORTED: (u64, &str) = (1_020_001, "1.20.1");
    if version < OLDEST_SUPPORTED.0 {
        let (major, minor, patch) = (version / 1_000_000, version / 1000 % 1000, version % 1000);
        eprintln!(
            "nginx {major}.{minor}.{patch} is too old: this module supports nginx {} and later \
             (before 1.19.10 nginx has no keepalive_time, nor the connection start time \
             the module measures it from; {} is the oldest release it is tested with)",
            OLDEST_SUPPORTED.1, OLDEST_SUPPORTED.1
        );
        std::process::exit(1);
    }

    println!("cargo::rerun-if-env-changed=DEP_NGINX_BUILD_DIR");
    if let Ok(build_dir) = std::env::var("DEP_NGINX_BUILD_DIR") {
        println!("cargo::rustc-env=DEP_NGINX_BUILD_DIR={build_dir}");
    }
}
