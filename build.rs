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

    // Older than the oldest nginx the suites run against is worth a word.
    const OLDEST_TESTED: (u64, &str) = (1_020_001, "1.20.1");
    if version < OLDEST_TESTED.0 {
        println!(
            "cargo::warning=nginx {version} is older than {}, the oldest nginx this module is tested with",
            OLDEST_TESTED.1
        );
    }

    println!("cargo::rerun-if-env-changed=DEP_NGINX_BUILD_DIR");
    if let Ok(build_dir) = std::env::var("DEP_NGINX_BUILD_DIR") {
        println!("cargo::rustc-env=DEP_NGINX_BUILD_DIR={build_dir}");
    }
}
