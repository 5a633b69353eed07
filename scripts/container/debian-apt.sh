# shellcheck shell=bash
# A private apt for fetching Debian packages without installing them or touching the host's apt
# state: its sources name the Debian archive this machine already uses (read from its own apt
# sources, so no mirror host name lives in the repository), for the host's own suite and for
# trixie. Lists and downloads live under the folder given to apt_private_init.
#
# Sourced by scripts/container-e2e.sh. Functions:
#   host_codename                  the host's Debian suite (bookworm, trixie, ...)
#   host_debian_mirror             the archive URI from the host's apt sources
#   apt_private_init DIR           write the configuration under DIR (sets APT_PRIVATE_OPTS)
#   apt_private_download DEST P/S  download package P from suite S into DEST (cached by name)

APT_EXTRA_SUITE=trixie

host_codename() {
  (. /etc/os-release && echo "${VERSION_CODENAME:-}")
}

# The first URI of a deb source whose suites include the host's own (not -security/-updates).
# SERESNET_DEBIAN_MIRROR overrides it.
host_debian_mirror() {
  if [ -n "${SERESNET_DEBIAN_MIRROR:-}" ]; then
    echo "$SERESNET_DEBIAN_MIRROR"
    return
  fi
  local codename f
  codename=$(host_codename)
  {
    for f in /etc/apt/sources.list.d/*.sources; do
      [ -f "$f" ] || continue
      awk -v cn="$codename" 'BEGIN { RS = ""; FS = "\n" }
        { t = u = s = ""
          for (i = 1; i <= NF; i++) {
            if ($i ~ /^Types:/) t = $i; else if ($i ~ /^URIs:/) u = $i; else if ($i ~ /^Suites:/) s = $i
          }
          if (t ~ /[ \t]deb([ \t]|$)/ && (s " ") ~ ("[ \t]" cn "[ \t]")) {
            sub(/^URIs:[ \t]*/, "", u); split(u, a, /[ \t]+/); print a[1]
          } }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
      [ -f "$f" ] || continue
      sed -E 's/\[[^]]*\]//' "$f" | awk -v cn="$codename" '$1 == "deb" && $3 == cn { print $2 }'
    done
  } | head -n 1
}

apt_private_init() {
  local dir=$1 mirror codename keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  mirror=$(host_debian_mirror)
  codename=$(host_codename)
  if [ -z "$mirror" ] || [ -z "$codename" ]; then
    echo "container-e2e: no Debian archive found in this machine's apt sources" \
         "(set SERESNET_DEBIAN_MIRROR to its URI)" >&2
    return 1
  fi
  if [ ! -f "$keyring" ]; then
    echo "container-e2e: $keyring missing (apt-get install debian-archive-keyring)" >&2
    return 1
  fi
  mkdir -p "$dir/sources.list.d" "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/state"
  cat > "$dir/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $codename $APT_EXTRA_SUITE
Components: main
Signed-By: $keyring
EOF
  APT_PRIVATE_UPDATED=
  APT_PRIVATE_OPTS=(
    -o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$dir/sources.list.d"
    -o "Dir::State=$dir/state" -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache"
    -o "Dir::State::status=/var/lib/dpkg/status" -o "APT::Sandbox::User=root"
    -o "Debug::NoLocking=1"
  )
}

# Downloads NAME/SUITE into DEST unless a NAME_*.deb is already there; updates the lists once.
apt_private_download() {
  local dest=$1 spec=$2 name=${2%%/*}
  mkdir -p "$dest"
  if compgen -G "$dest/${name}_*.deb" > /dev/null; then
    return 0
  fi
  if [ -z "$APT_PRIVATE_UPDATED" ]; then
    echo "container-e2e: updating the private apt lists ($(host_codename), $APT_EXTRA_SUITE)"
    apt-get -qq "${APT_PRIVATE_OPTS[@]}" update
    APT_PRIVATE_UPDATED=1
  fi
  (cd "$dest" && apt-get -qq "${APT_PRIVATE_OPTS[@]}" download "$spec")
}
