# Appended to nginx's objs/Makefile: cargo decides itself whether anything
# needs rebuilding, so the rule always runs. The module tables come from
# nginx's generated *_modules.c, hence no "export-modules" feature here.

cat << END                                                >> $NGX_MAKEFILE

$ngx_keepalive_slice_lib: FORCE_KEEPALIVE_SLICE
	cd $ngx_addon_dir && \\
	NGINX_BUILD_DIR="\$(CURDIR)/$NGX_OBJS" \\
	NGINX_SOURCE_DIR="\$(CURDIR)" \\
	CARGO_TARGET_DIR="\$(CURDIR)/$ngx_keepalive_slice_target" \\
	cargo rustc --lib --release --no-default-features --crate-type staticlib

FORCE_KEEPALIVE_SLICE:

END

if [ "$ngx_keepalive_slice_link" = DYNAMIC ]; then
    cat << END                                            >> $NGX_MAKEFILE
$NGX_OBJS${ngx_dirsep}ngx_http_upstream_keepalive_slice_module$ngx_modext: $ngx_keepalive_slice_lib

END
else
    cat << END                                            >> $NGX_MAKEFILE
$NGX_OBJS${ngx_dirsep}nginx$ngx_binext: $ngx_keepalive_slice_lib

END
fi
