# shellcheck shell=bash
# Stand-ins for the Debian base images the Dockerfile names (nothing can be pulled here): a
# `debootstrap --variant=minbase` root file system with the trimming of Debian's official slim
# images, plus this machine's extra CA certificates (HTTPS is intercepted here, and builds must
# trust what the host trusts), `docker import`ed under the exact name of the FROM line.
#
# Sourced by scripts/container-e2e.sh after debian-apt.sh and engine.sh. Functions:
#   dockerfile_base_images DOCKERFILE   the image names the FROM lines resolve to
#   base_image_import NAME CACHE WORK   make (or reuse, up to 7 days old) and import NAME

BASE_IMAGE_MAX_AGE_DAYS=7

# FROM lines name either an image or ${ARG} with a default given by an ARG line before the
# first FROM; stages built earlier in the file are not base images.
dockerfile_base_images() {
  awk '
    toupper($1) == "ARG" && !seen_from { split($2, kv, "="); if (kv[2] != "") arg[kv[1]] = kv[2] }
    toupper($1) == "FROM" {
      seen_from = 1; img = ""
      for (i = 2; i <= NF; i++) if ($i !~ /^--/) { img = $i; break }
      if (match(img, /^\$\{?[A-Za-z_][A-Za-z0-9_]*\}?$/)) { n = img; gsub(/[${}]/, "", n); img = arg[n] }
      for (i = 1; i <= NF; i++) if (toupper($i) == "AS" && i < NF) stage[tolower($(i + 1))] = 1
      if (img != "" && !(tolower(img) in stage)) print img
    }' "$1" | sort -u
}

# debian:trixie-slim -> trixie; debian:bookworm -> bookworm.
_base_image_suite() {
  local name=$1 tag
  case "$name" in
    debian:*) tag=${name#debian:}; echo "${tag%-slim}" ;;
    *) return 1 ;;
  esac
}

_base_image_rootfs_tar() {
  local suite=$1 cache=$2 work=$3 tar mirror
  tar="$cache/base/$suite-minbase-$(dpkg --print-architecture).tar"
  if [ -f "$tar" ] && [ -z "$(find "$tar" -mtime +"$BASE_IMAGE_MAX_AGE_DAYS")" ]; then
    echo "$tar"
    return 0
  fi
  mirror=$(host_debian_mirror)
  mkdir -p "$cache/base" "$work/rootfs-$suite"
  echo "container-e2e: debootstrap --variant=minbase $suite (cached for $BASE_IMAGE_MAX_AGE_DAYS days)" >&2
  if ! DEBOOTSTRAP_DIR="$ENGINE_ROOT/usr/share/debootstrap" nice -n 10 \
       "$ENGINE_ROOT/usr/sbin/debootstrap" --variant=minbase \
       --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
       "$suite" "$work/rootfs-$suite" "$mirror" > "$work/debootstrap-$suite.log" 2>&1; then
    echo "container-e2e: debootstrap failed; its log:" >&2
    tail -n 30 "$work/debootstrap-$suite.log" >&2
    return 1
  fi
  local root="$work/rootfs-$suite"
  # What Debian's slim images leave out (documentation, manuals, locales) and their apt cleanup.
  cat > "$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
  find "$root/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete 2>/dev/null || true
  rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
         "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
         "$root"/var/lib/apt/lists/* "$root"/var/log/*.log "$root"/var/log/apt/*
  tar --numeric-owner --xattrs -C "$root" -cf "$tar.partial" . && mv "$tar.partial" "$tar"
  rm -rf "$root"
  echo "$tar"
}

base_image_import() {
  local name=$1 cache=$2 work=$3 suite tar copy certs
  if ! suite=$(_base_image_suite "$name"); then
    echo "container-e2e: cannot make a stand-in for base image '$name' (only debian:<suite>[-slim])" >&2
    return 1
  fi
  tar=$(_base_image_rootfs_tar "$suite" "$cache" "$work") || return 1
  copy="$work/base-$suite.tar"
  cp "$tar" "$copy"
  local staged="$work/ca-$suite/usr/local/share/ca-certificates"
  mkdir -p "$staged"
  shopt -s nullglob
  certs=(/usr/local/share/ca-certificates/*.crt)
  shopt -u nullglob
  if [ ${#certs[@]} -gt 0 ]; then
    cp "${certs[@]}" "$staged/"
    chmod 0755 "$staged" && chmod 0644 "$staged"/*.crt
    tar --numeric-owner --owner=0 --group=0 -rf "$copy" -C "$work/ca-$suite" \
        ./usr/local/share/ca-certificates
  fi
  rm -rf "$work/ca-$suite"
  docker import -c 'CMD ["bash"]' "$copy" "$name" > /dev/null
  rm -f "$copy"
  echo "container-e2e: base image $name <- debootstrap $suite minbase" \
       "(+ ${#certs[@]} host CA certificate(s))"
}
